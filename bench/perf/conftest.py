"""The performance regression suite (pytest-benchmark): the kernels and one step of each mode, timed.

Not part of ``pytest`` (testpaths is tests/); run it on purpose, on one machine, before and after a change:

    pytest bench/perf --benchmark-enable --benchmark-only --benchmark-save=before        # on the base commit
    pytest bench/perf --benchmark-enable --benchmark-only --benchmark-compare=0001 \\
        --benchmark-compare-fail=median:15%                                             # on your change

Saved runs go to ``.benchmarks/<machine>/`` (pytest-benchmark's storage, keyed by the machine); a
comparison means something only between runs on the same machine. Every benchmark checks its output
against an independent computation before it is timed, so a fast wrong kernel fails here too.
Sizes stay small (a 2-core CPU runs the suite in about a minute); ``GFNET_PERF_SCALE=4`` multiplies the
batch sizes for a larger machine.
"""
import os

import pytest
import torch

#: Batch multiplier for larger machines (a GPU box, many cores).
SCALE = max(1, int(os.environ.get("GFNET_PERF_SCALE", "1")))


@pytest.fixture(scope="session")
def device():
    """Where the suite runs: GFNET_PERF_DEVICE (default: cuda if present, else cpu)."""
    name = os.environ.get("GFNET_PERF_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@pytest.fixture(autouse=True)
def _deterministic_inputs():
    torch.manual_seed(0)
    yield


def run_synced(device):
    """A wrapper that waits for the device after each call, so that a GPU's queued work is timed too."""
    def wrap(fn):
        def call():
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return out
        return call
    return wrap
