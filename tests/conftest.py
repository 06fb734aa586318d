"""Test set-up shared by every test: offline, deterministic, CPU."""

import os

# Tests never touch the network: any Hub access must fail fast and loudly.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# The models under test are tiny: intra-op threads cost more than the work they split
# (several times slower on a busy 2-core machine), so the suite runs single-threaded.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def model():
    """The tiny-random X-VILA, built once per test module (a module's tests may change its parts)."""
    from xvila import XVila

    return XVila.from_pretrained("tiny-random")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Input media by key (`media_factory.sample_media`), written once per test module."""
    from media_factory import sample_media

    return sample_media(tmp_path_factory.mktemp("media"))
