"""glance_resize: the whole batch resized to size x size (align_corners=True), fused with uint8->float,
normalisation and layout.

GFNet's glance step (Wang et al., NeurIPS 2020, Sec. 3.2) feeds the global encoder a P x P down-scaled copy
of the image, made with ``F.interpolate(..., align_corners=True)`` (bicubic or bilinear by backbone). The
kernel follows PyTorch's definition: source index ``scale * o`` with ``scale = (in - 1) / (out - 1)`` in the
compute dtype, bilinear with the upper tap clamped to the border, bicubic with Keys' kernel (A = -0.75) on
four taps whose indices are clamped to the border. Interpolation weights sum to one, so interpolating the raw
values and normalising afterwards equals normalising first up to float rounding, at P^2 instead of S^2
normalisations per channel.
"""
import torch

from gfnet.kernels._cast import TL_DTYPES, cast_out, normalise
from gfnet.kernels._triton import tl, triton


@triton.jit
def _cubic_weights(t, A: tl.constexpr):
    # Keys' cubic convolution kernel, evaluated at the distances 1 + t, t, 1 - t, 2 - t of the four taps.
    x1 = t + 1.0
    w0 = ((A * x1 - 5.0 * A) * x1 + 8.0 * A) * x1 - 4.0 * A
    w1 = ((A + 2.0) * t - (A + 3.0)) * t * t + 1.0
    x2 = 1.0 - t
    w2 = ((A + 2.0) * x2 - (A + 3.0)) * x2 * x2 + 1.0
    x3 = x2 + 1.0
    w3 = ((A * x3 - 5.0 * A) * x3 + 8.0 * A) * x3 - 4.0 * A
    return w0, w1, w2, w3


@triton.jit
def _source_index(o, in_size, OUT_SIZE: tl.constexpr, COMPUTE_F64: tl.constexpr):
    # align_corners=True: source = o * (in - 1) / (out - 1), the scale rounded to the compute dtype first
    # (0 for a single output pixel), then guarded into [0, in - 1] with a fraction in [0, 1] as PyTorch's
    # guard_index_and_lambda does.
    if COMPUTE_F64:
        scale = (in_size - 1).to(tl.float64) / tl.full((), OUT_SIZE - 1 if OUT_SIZE > 1 else 1, tl.float64)
        real = scale * o.to(tl.float64)
    else:
        scale = tl.math.div_rn((in_size - 1).to(tl.float32),
                               tl.full((), OUT_SIZE - 1 if OUT_SIZE > 1 else 1, tl.float32))
        real = scale * o.to(tl.float32)
    idx = tl.minimum(tl.maximum(tl.floor(real).to(tl.int32), 0), in_size - 1)
    t = tl.minimum(tl.maximum(real - idx, 0.0), 1.0)
    return idx, t


@triton.jit
def _glance_resize_kernel(
    x_ptr, out_ptr, norm_ptr,
    H, W,
    sxn, sxc, sxh, sxw,
    son, soc, soh, sow,
    BICUBIC: tl.constexpr, IS_UINT8: tl.constexpr, NORMALISE: tl.constexpr, COMPUTE_F64: tl.constexpr,
    OUT_DTYPE: tl.constexpr, P: tl.constexpr, BLOCK: tl.constexpr,
):
    # P is a compile-time constant (GFNet uses 96, 128 or 144): the per-element // and % by it become
    # multiply-shifts instead of integer divisions.
    # One program computes a block of output pixels of one sample, all three channels: the taps and weights
    # are computed once, and an HWC batch's three bytes of a pixel share a cache line.
    n = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P * P
    oy = offs // P
    ox = offs % P
    iy, ty = _source_index(oy, H, P, COMPUTE_F64)
    ix, tx = _source_index(ox, W, P, COMPUTE_F64)
    dst = out_ptr + n * son + oy.to(tl.int64) * soh + ox.to(tl.int64) * sow
    if BICUBIC:
        wy0, wy1, wy2, wy3 = _cubic_weights(ty, -0.75)
        wx0, wx1, wx2, wx3 = _cubic_weights(tx, -0.75)
    else:
        row0 = iy.to(tl.int64) * sxh
        row1 = tl.minimum(iy + 1, H - 1).to(tl.int64) * sxh
        col0 = ix.to(tl.int64) * sxw
        col1 = tl.minimum(ix + 1, W - 1).to(tl.int64) * sxw
    for c in tl.static_range(3):
        # int64: the channel stride of a planar batch (a [3, N, H, W] buffer seen as NCHW) passes 2^30
        # elements for N * H * W > 2^30, and c * stride would wrap in int32
        c64 = tl.full((), c, tl.int64)
        base = x_ptr + n * sxn + c64 * sxc
        if BICUBIC:
            acc = tl.zeros_like(ty)
            for k in tl.static_range(4):
                row = tl.minimum(tl.maximum(iy - 1 + k, 0), H - 1).to(tl.int64) * sxh
                wy = wy0 if k == 0 else (wy1 if k == 1 else (wy2 if k == 2 else wy3))
                line = tl.zeros_like(tx)
                for m in tl.static_range(4):
                    col = tl.minimum(tl.maximum(ix - 1 + m, 0), W - 1).to(tl.int64) * sxw
                    wx = wx0 if m == 0 else (wx1 if m == 1 else (wx2 if m == 2 else wx3))
                    v = tl.load(base + row + col, mask=mask, other=0).to(acc.dtype)
                    line += wx * v
                acc += wy * line
        else:
            v00 = tl.load(base + row0 + col0, mask=mask, other=0).to(ty.dtype)
            v01 = tl.load(base + row0 + col1, mask=mask, other=0).to(ty.dtype)
            v10 = tl.load(base + row1 + col0, mask=mask, other=0).to(ty.dtype)
            v11 = tl.load(base + row1 + col1, mask=mask, other=0).to(ty.dtype)
            acc = (1.0 - ty) * ((1.0 - tx) * v00 + tx * v01) + ty * ((1.0 - tx) * v10 + tx * v11)
        acc = normalise(acc, norm_ptr, c, IS_UINT8, NORMALISE, COMPUTE_F64)
        tl.store(dst + c64 * soc, cast_out(acc, OUT_DTYPE), mask=mask)


def glance_resize_triton(images, out, mode="bicubic", norm=None):
    """Launch the glance-resize kernel.

    images: Tensor[N, 3, H, W] (any strides), uint8 or float. out: Tensor[N, 3, P, P] float32/float16/
    bfloat16/float64 (any strides), written in place and returned. mode: "bicubic" or "bilinear".
    norm: Tensor[6] (mean then std, float64 for float64 images else float32) or None.
    All tensors on one CUDA device, or CPU tensors under TRITON_INTERPRET=1.
    """
    n, _, h, w = images.shape
    p = out.shape[-1]
    if n == 0:
        return out
    block = min(512, triton.next_power_of_2(p * p))
    grid = (n, triton.cdiv(p * p, block))
    _glance_resize_kernel[grid](
        images, out, norm if norm is not None else out, h, w,
        *images.stride(), *out.stride(),
        BICUBIC=mode == "bicubic", IS_UINT8=images.dtype == torch.uint8, NORMALISE=norm is not None,
        COMPUTE_F64=images.dtype == torch.float64, OUT_DTYPE=TL_DTYPES[out.dtype], P=p, BLOCK=block,
    )
    return out
