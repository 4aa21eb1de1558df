"""Output conversion shared by the kernels of gfnet.kernels.

Triton's interpreter (TRITON_INTERPRET=1, how the tests run every kernel on the CPU) converts float32 to
bfloat16 by truncation, while the GPU and torch round to nearest even. Rounding the float32 bits by hand
first makes the final conversion exact, so a bf16 output is bit-identical to ``x.to(torch.bfloat16)`` under
both the GPU compiler and the interpreter (a few integer operations on a memory-bound kernel cost nothing).
"""
from gfnet.kernels._triton import tl, triton


@triton.jit
def cast_out(v, OUT_DTYPE: tl.constexpr):
    """Tensor[BLOCK] float32/float64 -> OUT_DTYPE, rounding to nearest even on every backend."""
    if OUT_DTYPE == tl.bfloat16:
        u = v.to(tl.float32).to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return v.to(OUT_DTYPE)
