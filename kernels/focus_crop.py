"""focus_crop: per-sample integer crops of a batch, fused with uint8->float, normalisation and layout.

GFNet's focus step (Wang et al., NeurIPS 2020, Sec. 3.2) crops a P x P patch whose top-left corner is
``floor(a * (S - P))`` from each full-resolution image. One Triton program copies a block of one channel of
one sample's patch; the corners come in as an int32 tensor so no value ever visits the host.
"""
import torch

from gfnet.kernels._cast import cast_out, normalise
from gfnet.kernels._reference import compute_dtype, finish_ref, normalise_ref
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


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
              torch.float64: tl.float64}


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
        COMPUTE_F64=images.dtype == torch.float64, OUT_DTYPE=_TL_DTYPES[out.dtype], P=p, BLOCK=block,
    )
    return out


def focus_corners(actions, image_size, patch_size):
    """GFNet's patch corner, the one definition every crop uses: ``floor(a * (S - P))`` computed in the
    actions' dtype, as the reference computes it, then int32 (a[:, 0] the row, a[:, 1] the column).

    actions: Tensor[N, 2] float in [0, 1]; image_size: S; patch_size: P. Returns Tensor[N, 2] int32 on the
    actions' device (no host synchronisation)."""
    return torch.floor(actions * (image_size - patch_size)).to(torch.int32)


def focus_crop_ref(images, actions, patch_size, mean=None, std=None, out_dtype=None, channels_last=False):
    """Plain-PyTorch focus crop: the definition the kernels are tested against.

    images: Tensor[N, 3, H, W] (any strides), uint8 or float. actions: Tensor[N, 2] in [0, 1], (row, column).
    The corner is ``floor(actions * (S - P))`` computed in the actions' dtype, exactly as the GFNet reference
    does it. Returns Tensor[N, 3, P, P] in ``out_dtype`` (default: float32 for uint8 input, else the input's).
    """
    n, _, h, w = images.shape
    p = patch_size
    corners = focus_corners(actions, h, p).long()
    idx = torch.arange(p, device=images.device)
    rows = (corners[:, 0:1] + idx).view(n, 1, p, 1)
    cols = (corners[:, 1:2] + idx).view(n, 1, 1, p)
    x = images[torch.arange(n, device=images.device).view(n, 1, 1, 1),
               torch.arange(3, device=images.device).view(1, 3, 1, 1), rows, cols]
    x = x.to(compute_dtype(images))
    x = normalise_ref(x, images.dtype, mean, std)
    return finish_ref(x, images.dtype, out_dtype, channels_last)
