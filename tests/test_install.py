"""The project as users install it: a wheel that holds every package and the assets, an
installed package that finds its assets from anywhere, and the README's Python example
run as pasted."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from xvila.resources import AssetNotFoundError, asset_path, assets_dir

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["lighthouse.png", "waves.mp4", "bell.wav"]


def run(cmd: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    # Clean of this interpreter's path: a subprocess must find xvila only where the test puts it.
    # One thread, as in-process tests run (conftest): tiny models on a busy 2-core machine.
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"} | env
    done = subprocess.run(cmd, cwd=cwd, env=environ, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel --no-deps .` on a copy of the checkout (the build writes build/ and
    *.egg-info/ beside the sources). No build isolation: the build needs no network."""
    src = tmp_path_factory.mktemp("src") / "xvila"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "outputs", "runs"))
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), "."], src)
    (whl,) = out.glob("xvila-*.whl")
    return whl


def test_the_wheel_holds_every_package_and_the_assets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = sorted(str(p.parent.relative_to(ROOT)) for p in (ROOT / "xvila").rglob("__init__.py"))
    for package in packages:  # pyproject.toml lists them by hand: a new one must be added there
        assert f"{package}/__init__.py" in names, f"{package} is missing from pyproject.toml's packages"
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "xvila").rglob("*.py")}
    assert modules <= names
    for name in EXAMPLES + ["make_examples.py"]:
        assert f"xvila/assets/{name}" in names
    toy = {str(p.relative_to(ROOT / "assets")) for p in (ROOT / "assets" / "toy").rglob("*") if p.is_file()}
    assert {f"xvila/assets/{t}" for t in toy} <= names  # the toy model's weights, once they exist


def test_an_installed_wheel_finds_its_assets_and_presets_from_anywhere(wheel, tmp_path):
    site = tmp_path / "site"
    run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import xvila, xvila.resources as r\n"
        "from xvila.config import XVilaConfig\n"
        "print(xvila.__file__)\n"
        "print(r.assets_dir())\n"
        "print(r.asset_path('lighthouse.png').stat().st_size)\n"
        "print(XVilaConfig.from_name('tiny-random').name)\n"
    )
    out = run([sys.executable, "-c", code], elsewhere, PYTHONPATH=str(site)).stdout.split()
    assert out[0] == str(site / "xvila" / "__init__.py")
    assert out[1] == str(site / "xvila" / "assets")
    assert int(out[2]) == (ROOT / "assets" / "lighthouse.png").stat().st_size
    assert out[3] == "tiny-random"


def test_a_checkout_reads_its_own_assets_folder():
    assert assets_dir() == ROOT / "assets"
    assert asset_path("lighthouse.png") == ROOT / "assets" / "lighthouse.png"
    with pytest.raises(AssetNotFoundError, match="nothing.png is not in X-VILA's assets folder"):
        asset_path("nothing.png")


def test_the_readme_python_example_runs_as_pasted(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Using the model"):]
    start = section.index("```python") + len("```python")
    code = section[start:section.index("```", start)]
    assert "tiny-random" in code and "assets/lighthouse.png" in code
    # The user's working directory: the repository root, as the README says. Here a fresh
    # folder with the assets beside it, so that the example's save lands in tmp_path.
    (tmp_path / "assets").symlink_to(ROOT / "assets")
    out = run([sys.executable, "-c", code], tmp_path, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1").stdout
    videos = [line.split()[-1] for line in out.splitlines() if line.startswith(" video TA+VEH ")]
    assert len(videos) == 1 and videos[0].endswith("-video-ta-veh.mp4") and Path(videos[0]).stat().st_size > 0
    assert "video 25/25" in out  # the progress events
    assert (tmp_path / "my-xvila" / "config.json").is_file()
