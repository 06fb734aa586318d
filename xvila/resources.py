"""Where the repository's `assets/` folder is, from a checkout or from an installed wheel.

    from xvila.resources import asset_path
    asset_path("lighthouse.png")        # the demo's example picture
    asset_path("toy")                   # the toy base and model (assets/toy/)

The folder lives at the repository's root (`assets/`); the wheel carries a copy as
`xvila/assets/` (`pyproject.toml` maps the package `xvila.assets` to it). A checkout, and
an editable install (`pip install -e .`), read the root folder itself.
"""

from __future__ import annotations

from pathlib import Path

from xvila.errors import XVilaError

_PACKAGE = Path(__file__).resolve().parent


class AssetNotFoundError(XVilaError, FileNotFoundError):
    """The assets folder, or a file asked for in it, is not there."""


def assets_dir() -> Path:
    """The assets folder: the installed copy inside the package, else the checkout's."""
    installed = _PACKAGE / "assets"
    # The checkout's folder is recognised by its generator script, so that an unrelated
    # `assets/` beside an installed package (in site-packages) is never taken for it.
    checkout = _PACKAGE.parent / "assets"
    for folder in (installed, checkout):
        if (folder / "make_examples.py").is_file():
            return folder
    raise AssetNotFoundError(
        f"X-VILA's assets folder is missing: neither {installed} (an installed package) nor {checkout} "
        "(a checkout) holds it; reinstall the package (`pip install .` from the repository)"
    )


def asset_path(*parts: str) -> Path:
    """A file or folder inside the assets folder; an error naming it when it is absent."""
    path = assets_dir().joinpath(*parts)
    if not path.exists():
        raise AssetNotFoundError(f"{'/'.join(parts)} is not in X-VILA's assets folder ({assets_dir()})")
    return path
