"""The normalisation epilogue and output conversion shared by the kernels of gfnet.kernels.

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


@triton.jit
def normalise(v, norm_ptr, c, IS_UINT8: tl.constexpr, NORMALISE: tl.constexpr, COMPUTE_F64: tl.constexpr):
    """The epilogue every kernel shares: x / 255 for uint8, then (x - mean[c]) / std[c].

    The same operations in the same order as the reference, so that the results are bit-identical, each
    correctly rounded (Triton's plain ``/`` on float32 is an approximate division on the GPU; div_rn is
    the IEEE one). mean and std come from memory (norm_ptr[0:3], norm_ptr[3:6]), not as scalar
    arguments: Triton types Python floats as float32, which would round a float64 computation's constants.
    """
    if IS_UINT8:
        v = tl.math.div_rn(v, 255.0)
    if NORMALISE:
        m = tl.load(norm_ptr + c)
        s = tl.load(norm_ptr + 3 + c)
        if COMPUTE_F64:
            v = (v - m) / s
        else:
            v = tl.math.div_rn(v - m, s)
    return v
