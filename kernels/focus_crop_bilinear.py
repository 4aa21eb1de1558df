"""focus_crop_bilinear: differentiable crops at fractional positions (AdaFocusV2's crop), forward and backward,
fused with uint8->float, normalisation and layout.

Convention (shared by the kernels, the reference and the C++ path): for sample n with center (cy, cx) in
[0, 1]^2 (row, column), normalised over the image so that 0 is the first pixel's center and 1 the last's,
output pixel (i, j) of the P x P patch samples the image at

    y = cy * (H - 1) + (i - (P - 1) / 2) * scale,    x = cx * (W - 1) + (j - (P - 1) / 2) * scale

in pixel-index coordinates, by bilinear interpolation of the normalised image with zero padding outside it
(``F.grid_sample(normalised, grid, align_corners=True, padding_mode="zeros")``). The patch therefore covers
scale * P pixels of the image; with scale = 1 and an integer top-left corner it is the integer crop.
The backward pass gives d/d images (float inputs) and d/d centers (the bilinear weights' derivative,
one-sided at integer positions as grid_sample's).
"""
import torch

from gfnet.kernels._cast import TL_DTYPES, cast_out, div_ieee
from gfnet.kernels._triton import tl, triton


@triton.jit
def _normalised(v, m, s, IS_UINT8: tl.constexpr, COMPUTE_F64: tl.constexpr):
    # (v / 255 - mean) / std with correctly rounded divisions, as the reference (and the other kernels).
    if IS_UINT8:
        v = div_ieee(v, 255.0, COMPUTE_F64)
    return div_ieee(v - m, s, COMPUTE_F64)


@triton.jit
def _sample_taps(x_ptr, params_ptr, centers_ptr, n, c, offs, mask, H, W, sxn, sxc, sxh, sxw,
                 IS_UINT8: tl.constexpr, NORMALISE: tl.constexpr, COMPUTE_F64: tl.constexpr, P: tl.constexpr):
    # For a block of patch pixels: the upper-left tap (y0, x0), the fractions, each tap's validity and its
    # normalised value. The compute dtype is the centers' (float64 or float32). The validity masks are what
    # keeps every load inside the image, whatever the centers hold (NaN and huge values included).
    i = offs // P
    j = offs % P
    scale = tl.load(params_ptr + 6)
    half = (P - 1) * 0.5
    y = tl.load(centers_ptr + 2 * n) * (H - 1) + (i.to(scale.dtype) - half) * scale
    x = tl.load(centers_ptr + 2 * n + 1) * (W - 1) + (j.to(scale.dtype) - half) * scale
    yf = tl.floor(y)
    xf = tl.floor(x)
    ly = y - yf
    lx = x - xf
    y0 = yf.to(tl.int32)
    x0 = xf.to(tl.int32)
    base = x_ptr + n * sxn + c.to(tl.int64) * sxc  # int64: a planar batch's channel stride passes 2^30
    if NORMALISE:
        m = tl.load(params_ptr + c)
        s = tl.load(params_ptr + 3 + c)
    else:
        m = 0.0
        s = 1.0
    vy0 = (y0 >= 0) & (y0 < H)
    vy1 = (y0 + 1 >= 0) & (y0 + 1 < H)
    vx0 = (x0 >= 0) & (x0 < W)
    vx1 = (x0 + 1 >= 0) & (x0 + 1 < W)
    o00 = y0.to(tl.int64) * sxh + x0.to(tl.int64) * sxw
    o01 = o00 + sxw
    o10 = o00 + sxh
    o11 = o10 + sxw
    k00 = mask & vy0 & vx0
    k01 = mask & vy0 & vx1
    k10 = mask & vy1 & vx0
    k11 = mask & vy1 & vx1
    # Zero padding in the normalised image, as grid_sample over a normalised batch pads.
    v00 = tl.where(k00, _normalised(tl.load(base + o00, mask=k00, other=0).to(y.dtype), m, s, IS_UINT8,
                                    COMPUTE_F64), 0.0)
    v01 = tl.where(k01, _normalised(tl.load(base + o01, mask=k01, other=0).to(y.dtype), m, s, IS_UINT8,
                                    COMPUTE_F64), 0.0)
    v10 = tl.where(k10, _normalised(tl.load(base + o10, mask=k10, other=0).to(y.dtype), m, s, IS_UINT8,
                                    COMPUTE_F64), 0.0)
    v11 = tl.where(k11, _normalised(tl.load(base + o11, mask=k11, other=0).to(y.dtype), m, s, IS_UINT8,
                                    COMPUTE_F64), 0.0)
    return i, j, y0, x0, ly, lx, k00, k01, k10, k11, v00, v01, v10, v11, s


@triton.jit
def _focus_crop_bilinear_fwd_kernel(
    x_ptr, centers_ptr, params_ptr, out_ptr,
    H, W,
    sxn, sxc, sxh, sxw,
    son, soc, soh, sow,
    IS_UINT8: tl.constexpr, NORMALISE: tl.constexpr, COMPUTE_F64: tl.constexpr, OUT_DTYPE: tl.constexpr,
    P: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_nc = tl.program_id(0)
    n = (pid_nc // 3).to(tl.int64)
    c = pid_nc % 3
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P * P
    i, j, _y0, _x0, ly, lx, _k00, _k01, _k10, _k11, v00, v01, v10, v11, _s = _sample_taps(
        x_ptr, params_ptr, centers_ptr, n, c, offs, mask, H, W, sxn, sxc, sxh, sxw, IS_UINT8, NORMALISE, COMPUTE_F64, P)
    val = (1.0 - ly) * ((1.0 - lx) * v00 + lx * v01) + ly * ((1.0 - lx) * v10 + lx * v11)
    dst = out_ptr + n * son + c.to(tl.int64) * soc + i.to(tl.int64) * soh + j.to(tl.int64) * sow
    tl.store(dst, cast_out(val, OUT_DTYPE), mask=mask)


@triton.jit
def _focus_crop_bilinear_bwd_kernel(
    x_ptr, centers_ptr, params_ptr, grad_out_ptr, grad_x_ptr, grad_c_ptr,
    H, W,
    sxn, sxc, sxh, sxw,
    sgn, sgc, sgh, sgw,
    gxn, gxc, gxh, gxw,
    IS_UINT8: tl.constexpr, NORMALISE: tl.constexpr, COMPUTE_F64: tl.constexpr, NEED_IMAGES: tl.constexpr,
    NEED_CENTERS: tl.constexpr, P: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_nc = tl.program_id(0)
    n = (pid_nc // 3).to(tl.int64)
    c = pid_nc % 3
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P * P
    i, j, y0, x0, ly, lx, k00, k01, k10, k11, v00, v01, v10, v11, s = _sample_taps(
        x_ptr, params_ptr, centers_ptr, n, c, offs, mask, H, W, sxn, sxc, sxh, sxw, IS_UINT8, NORMALISE, COMPUTE_F64, P)
    g = tl.load(grad_out_ptr + n * sgn + c.to(tl.int64) * sgc + i.to(tl.int64) * sgh + j.to(tl.int64) * sgw,
                mask=mask, other=0).to(ly.dtype)
    g = tl.where(mask, g, 0.0)
    if NEED_IMAGES:
        # Neighbouring output pixels share taps, so the scatter needs atomics (the result is deterministic
        # up to the order of float additions). d value / d pixel = 1 / (div * std); div is 1 here because
        # uint8 images carry no gradient.
        gs = div_ieee(g, s, COMPUTE_F64)
        g00 = grad_x_ptr + n * gxn + c.to(tl.int64) * gxc + y0.to(tl.int64) * gxh + x0.to(tl.int64) * gxw
        tl.atomic_add(g00, gs * (1.0 - ly) * (1.0 - lx), mask=k00)
        tl.atomic_add(g00 + gxw, gs * (1.0 - ly) * lx, mask=k01)
        tl.atomic_add(g00 + gxh, gs * ly * (1.0 - lx), mask=k10)
        tl.atomic_add(g00 + gxh + gxw, gs * ly * lx, mask=k11)
    if NEED_CENTERS:
        dy = (1.0 - lx) * (v10 - v00) + lx * (v11 - v01)
        dx = (1.0 - ly) * (v01 - v00) + ly * (v11 - v10)
        tl.atomic_add(grad_c_ptr + 2 * n, tl.sum(g * dy, axis=0) * (H - 1))
        tl.atomic_add(grad_c_ptr + 2 * n + 1, tl.sum(g * dx, axis=0) * (W - 1))


def _block(p):
    return min(512, triton.next_power_of_2(p * p))


def focus_crop_bilinear_triton(images, centers, params, out, normalise):
    """Launch the forward kernel.

    images: Tensor[N, 3, H, W] (any strides), uint8 or float. centers: Tensor[N, 2] contiguous, in the
    compute dtype (float64 for float64 images, else float32). params: Tensor[7] in the compute dtype:
    mean (3), std (3), scale; mean/std are read only when ``normalise``. out: Tensor[N, 3, P, P]
    float32/float16/bfloat16/float64 (any strides), written in place and returned.
    All tensors on one CUDA device, or CPU tensors under TRITON_INTERPRET=1.
    """
    n, _, h, w = images.shape
    p = out.shape[-1]
    if n == 0:
        return out
    block = _block(p)
    _focus_crop_bilinear_fwd_kernel[(n * 3, triton.cdiv(p * p, block))](
        images, centers, params, out, h, w, *images.stride(), *out.stride(),
        IS_UINT8=images.dtype == torch.uint8, NORMALISE=normalise, COMPUTE_F64=centers.dtype == torch.float64,
        OUT_DTYPE=TL_DTYPES[out.dtype], P=p, BLOCK=block,
    )
    return out


def focus_crop_bilinear_backward_triton(grad_out, images, centers, params, normalise, grad_images, grad_centers):
    """Launch the backward kernel: accumulates into ``grad_images`` (Tensor[N, 3, H, W] in the compute dtype,
    zero-filled, any strides; None to skip) and ``grad_centers`` (Tensor[N, 2] contiguous, compute dtype,
    zero-filled; None to skip). grad_out: Tensor[N, 3, P, P], any strides and float dtype.
    """
    n, _, h, w = images.shape
    p = grad_out.shape[-1]
    if n == 0 or (grad_images is None and grad_centers is None):
        return
    block = _block(p)
    gx = grad_images if grad_images is not None else params
    gx_strides = grad_images.stride() if grad_images is not None else (0, 0, 0, 0)
    _focus_crop_bilinear_bwd_kernel[(n * 3, triton.cdiv(p * p, block))](
        images, centers, params, grad_out, gx, grad_centers if grad_centers is not None else params,
        h, w, *images.stride(), *grad_out.stride(), *gx_strides,
        IS_UINT8=images.dtype == torch.uint8, NORMALISE=normalise, COMPUTE_F64=centers.dtype == torch.float64,
        NEED_IMAGES=grad_images is not None, NEED_CENTERS=grad_centers is not None, P=p, BLOCK=block,
    )
