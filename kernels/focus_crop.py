"""focus_crop: per-sample integer crops of a batch, fused with uint8->float, normalisation and layout.

GFNet's focus step (Wang et al., NeurIPS 2020, Sec. 3.2) crops a P x P patch whose top-left corner is
``floor(a * (S - P))`` from each full-resolution image. One Triton program copies a block of one channel of
one sample's patch; the corners come in as an int32 tensor so no value ever visits the host.
"""
import torch

from gfnet.kernels._cast import TL_DTYPES, cast_out, normalise
from gfnet.kernels._triton import tl, triton


@triton.jit
def _focus_crop_kernel(
    x_ptr, corner_ptr, out_ptr,
    H, W,
    sxn, sxc, sxh, sxw,
    son, soc, soh, sow,
    norm_ptr,
    IS_UINT8: tl.constexpr, NORMALISE: tl.constexpr, COMPUTE_F64: tl.constexpr,
    OUT_DTYPE: tl.constexpr, P: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program copies a block of patch pixels of one sample, all three channels: the corner and the
    # offsets are computed once, and an HWC batch's three bytes of a pixel share a cache line.
    # P is a compile-time constant (GFNet uses 96, 128 or 144): the per-element // and % by it become
    # multiply-shifts instead of integer divisions.
    n = tl.program_id(0).to(tl.int64)  # int64: batch * image offsets overflow int32 past ~14k images of 224^2
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P * P
    i = offs // P
    j = offs % P
    # Clamped so that an unvalidated action (NaN, out of [0, 1]) can never read outside the image.
    y0 = tl.minimum(tl.maximum(tl.load(corner_ptr + 2 * n), 0), H - P)
    x0 = tl.minimum(tl.maximum(tl.load(corner_ptr + 2 * n + 1), 0), W - P)
    src = x_ptr + n * sxn + (y0 + i).to(tl.int64) * sxh + (x0 + j).to(tl.int64) * sxw
    dst = out_ptr + n * son + i.to(tl.int64) * soh + j.to(tl.int64) * sow
    for c in tl.static_range(3):
        # int64: the channel stride of a planar batch (a [3, N, H, W] buffer seen as NCHW) passes 2^30
        # elements for N * H * W > 2^30, and c * stride would wrap in int32
        c64 = tl.full((), c, tl.int64)
        v = tl.load(src + c64 * sxc, mask=mask, other=0)
        if COMPUTE_F64:
            v = v.to(tl.float64)
        else:
            v = v.to(tl.float32)
        v = normalise(v, norm_ptr, c, IS_UINT8, NORMALISE, COMPUTE_F64)
        tl.store(dst + c64 * soc, cast_out(v, OUT_DTYPE), mask=mask)


def focus_crop_triton(images, corners, out, norm=None):
    """Launch the focus-crop kernel.

    images: Tensor[N, 3, H, W] (any strides: an HWC batch is passed as its permuted view), uint8 or float.
    corners: Tensor[N, 2] int32, contiguous, same device: (row, column) of each patch's top-left corner.
    out: Tensor[N, 3, P, P] float32/float16/bfloat16/float64 (any strides), written in place and returned.
    norm: Tensor[6] (mean then std, in [0, 1] units, float64 for float64 images else float32) or None for
    no normalisation. All tensors on one CUDA device, or CPU tensors under TRITON_INTERPRET=1.
    """
    n, _, h, w = images.shape
    p = out.shape[-1]
    if n == 0:
        return out
    block = min(1024, triton.next_power_of_2(p * p))
    grid = (n, triton.cdiv(p * p, block))
    _focus_crop_kernel[grid](
        images, corners, out, h, w,
        *images.stride(), *out.stride(), norm if norm is not None else out,
        IS_UINT8=images.dtype == torch.uint8, NORMALISE=norm is not None,
        COMPUTE_F64=images.dtype == torch.float64, OUT_DTYPE=TL_DTYPES[out.dtype], P=p, BLOCK=block,
    )
    return out
