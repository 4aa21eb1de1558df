import os

# Triton kernels run on CPU tensors through Triton's interpreter; it must be set before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def native_cpu_convolutions():
    """Turn oneDNN off for a test: it builds its kernels anew for every batch shape (seconds each on a
    2-core machine), and budgeted inference meets several shapes (partial batches). Results do not
    depend on the convolution backend."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is present")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
