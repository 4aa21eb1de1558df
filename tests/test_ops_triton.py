"""The Triton kernels compile for real GPUs, checked without one; the references work without Triton.

The interpreter (how test_ops.py runs the kernels) executes them with numpy and forgives what the GPU
compiler refuses (types that do not unify, unsupported atomics, ...). Here every kernel variant is compiled
ahead of time for sm_80 and sm_90 down to a cubin (gfnet.bench.kernel_compile, in a subprocess because the
kernels must be decorated with TRITON_INTERPRET unset), and the PTX is checked for the IEEE division that makes
the focus crop bit-identical to the reference.
"""
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def compiled():
    from gfnet.bench.kernel_compile import run_isolated

    return run_isolated([80, 90], timeout=300)


def test_every_kernel_compiles_for_sm80_and_sm90(compiled):
    failures = {k: v.get("error", "no cubin") for k, v in compiled.items() if not v["ok"]}
    assert len(compiled) == 2 * 4 * 5  # 2 archs x 4 dtype pairs x (crop, 2 glance modes, bilinear fwd, bwd)
    assert not failures, failures


def test_every_kernel_uses_ieee_division(compiled):
    # Triton's plain float32 `/` is div.full.f32 (approximate) on NVIDIA GPUs; every kernel must use div.rn to
    # stay bit-identical (the crop) or as close as the reference allows (the others) to torch's x / 255 and
    # (x - mean) / std. (The bilinear crop once used the approximate one.)
    from gfnet.bench.kernel_compile import check_division

    assert check_division(compiled) == []
    assert sum("div.rn.f32" in r["ptx"] for r in compiled.values()) >= 2 * 3 * 5  # the float32-compute variants


NO_TRITON = r"""
import builtins
real_import = builtins.__import__


def no_triton(name, *args, **kwargs):
    if name == "triton" or name.startswith("triton."):
        raise ImportError("No module named 'triton'")
    return real_import(name, *args, **kwargs)


builtins.__import__ = no_triton
import torch
from gfnet import ops
x = torch.randint(0, 256, (2, 12, 12, 3), dtype=torch.uint8)
a = torch.rand(2, 2)
assert ops.focus_crop(x, a, 5, backend="torch").shape == (2, 3, 5, 5)
assert ops.glance_resize(x, 6, backend="torch").shape == (2, 3, 6, 6)
assert ops.focus_crop_bilinear(x, a, 5, backend="torch").shape == (2, 3, 5, 5)
print("ok")
"""


def test_references_work_without_triton():
    # Where Triton is not installed (macOS, Windows), the plain-PyTorch references beside the kernels must
    # still import: they are the fallback when gfnet._C is missing too.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", NO_TRITON], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-4000:]
