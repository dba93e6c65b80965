import os

# Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine torch's spinning
# threads slow them down many times over; subprocesses (notebook kernels, torchrun) inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need a GPU: skipped, with the reason, where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (scripts/gpu_check.sh runs them on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
