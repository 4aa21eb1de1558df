import os

import torch

# Triton kernels run on CPU tensors through Triton's interpreter on machines without a GPU. It must be set
# before triton loads, and only there: on a GPU machine the `cuda` tests must run the compiled kernels (the
# interpreter would run CUDA tensors through host copies and break CUDA-graph capture).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

# Under pytest-xdist (the README's test command) the workers share the CPUs: each takes its share, so that
# OpenMP's spinning barriers of one worker never wait on threads the other worker's tests have descheduled.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // max(1, _WORKERS))))


@pytest.fixture
def one_thread():
    """One torch thread for a test: tiny models are dominated by per-op overhead, where one thread is as fast
    on an idle machine and avoids OpenMP's spinning barriers, which make two threads crawl on a loaded one."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


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


#: The longest test files (minutes each on the 2-core machine), in this order before all others: pytest-xdist's
#: loadfile mode hands files to its workers in collection order, so the long ones start at once and the short
#: ones fill in around them (longest first) instead of one long file running alone at the end.
LONGEST_FILES = ("test_deploy_executorch.py", "test_deploy_backbones.py", "test_distributed.py", "test_demo.py",
                 "test_deploy.py", "test_faults.py", "test_compile.py", "test_gpucheck.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))  # stable: file order kept
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is present")
    compiled = pytest.mark.skip(reason="Triton on CPU tensors needs TRITON_INTERPRET=1, which is off where a GPU "
                                       "is present: the cuda tests run the compiled kernels instead")
    for item in items:
        if "cuda" in item.keywords:
            if not torch.cuda.is_available():
                item.add_marker(no_gpu)
            continue
        params = getattr(item, "callspec", None)
        uses_triton_on_cpu = (params is not None and params.params.get("backend") == "triton") or \
            "triton_interpreted" in item.name
        if uses_triton_on_cpu and not INTERPRETING:
            item.add_marker(compiled)
