"""The normalisation epilogue and output conversion shared by the kernels of gfnet.kernels.

Triton's interpreter (TRITON_INTERPRET=1, how the tests run every kernel on the CPU) converts float32 to
bfloat16 by truncation, while the GPU and torch round to nearest even. Rounding the float32 bits by hand
first makes the final conversion exact, so a bf16 output is bit-identical to ``x.to(torch.bfloat16)`` under
both the GPU compiler and the interpreter (a few integer operations on a memory-bound kernel cost nothing).
NaN needs its own case: adding the rounding bias to a NaN's bits carries into the sign and exponent (the
GPU's canonical NaN 0x7FFFFFFF would become -0.0), so NaNs are written as torch writes them (0x7FC0).
"""
import torch

from gfnet.kernels._triton import tl, triton

#: torch dtype -> Triton dtype of the kernels' outputs.
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float64: tl.float64}


@triton.jit
def cast_out(v, OUT_DTYPE: tl.constexpr):
    """Tensor[BLOCK] float32/float64 -> OUT_DTYPE, rounding to nearest even on every backend."""
    if OUT_DTYPE == tl.bfloat16:
        f = v.to(tl.float32)
        u = f.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        u = tl.where(f != f, 0x7FC00000, u)
        return u.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return v.to(OUT_DTYPE)


@triton.jit
def div_ieee(a, b, COMPUTE_F64: tl.constexpr):
    """a / b correctly rounded: Triton's ``/`` on float32 compiles to an approximate division on the GPU
    (div.full.f32); div_rn is the IEEE one. float64 division is IEEE already."""
    if COMPUTE_F64:
        return a / b
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def normalise(v, norm_ptr, c, IS_UINT8: tl.constexpr, NORMALISE: tl.constexpr, COMPUTE_F64: tl.constexpr):
    """The epilogue every kernel shares: x / 255 for uint8, then (x - mean[c]) / std[c].

    The same operations in the same order as the reference, so that the results are bit-identical, each
    correctly rounded (Triton's plain ``/`` on float32 is an approximate division on the GPU; div_rn is
    the IEEE one). mean and std come from memory (norm_ptr[0:3], norm_ptr[3:6]), not as scalar
    arguments: Triton types Python floats as float32, which would round a float64 computation's constants.
    """
    if IS_UINT8:
        v = div_ieee(v, 255.0, COMPUTE_F64)
    if NORMALISE:
        m = tl.load(norm_ptr + c)
        s = tl.load(norm_ptr + 3 + c)
        v = div_ieee(v - m, s, COMPUTE_F64)
    return v
