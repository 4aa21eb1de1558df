"""gfnet::focus_crop, the focus step's crop (Wang et al., NeurIPS 2020, Sec. 3.2): a P x P integer crop of
each full-resolution image whose top-left corner is ``floor(a * (S - P))`` (a[:, 0] the row, a[:, 1] the
column), as the reference code crops; fused with uint8 -> float, normalisation, output dtype and layout.

Kernels (see gfnet.ops._dispatch): gfnet._C on the CPU, kernels/focus_crop.py's Triton kernel on CUDA, its
plain-PyTorch reference ``focus_crop_ref`` elsewhere and under ``use_backend("torch")``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from gfnet.kernels.reference import focus_corners, focus_crop_ref
from gfnet.ops import _checks as C
from gfnet.ops._dispatch import cpu_kernels, register_kernels, select_backend, triton_kernels, use_backend

__all__ = ["focus_crop", "focus_corners"]


def _run(backend: str, images, actions, patch_size, mean, std, out_dtype, channels_last) -> torch.Tensor:
    x = C.as_nchw(images)
    out = C.empty_out(x, patch_size, out_dtype, channels_last)
    if backend == "torch":
        return out.copy_(focus_crop_ref(x, actions, patch_size, mean, std, out_dtype))
    corners = focus_corners(actions, x.shape[2], patch_size).contiguous()
    if backend == "cpp":
        return cpu_kernels().focus_crop(x, corners, out, mean, std)
    norm = C.kernel_params(mean, std, (), C.compute_dtype(x), x.device) if mean is not None else None
    return triton_kernels("focus_crop").focus_crop_triton(x, corners, out, norm)


@torch.library.custom_op("gfnet::focus_crop", mutates_args=())
def _focus_crop_op(images: torch.Tensor, actions: torch.Tensor, patch_size: int, mean: Optional[List[float]],
                   std: Optional[List[float]], out_dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    # Devices without a kernel of their own: the reference.
    return _run("torch", images, actions, patch_size, mean, std, out_dtype, channels_last)


register_kernels(_focus_crop_op, _run)


@_focus_crop_op.register_fake
def _(images, actions, patch_size, mean, std, out_dtype, channels_last):
    return C.empty_out(C.as_nchw(images), patch_size, out_dtype, channels_last)


def _setup_context(ctx, inputs, output):
    images, actions, patch_size, mean, std, out_dtype, channels_last = inputs
    ctx.meta = C.images_meta(images)
    ctx.save_for_backward(actions)
    ctx.args = (patch_size, std)


def _backward(ctx, grad_out):
    # The crop's adjoint: the (normalisation-scaled) patch gradient scattered back to the corner that the
    # forward read, clamped as the kernels clamp. The actions get none: the corner is piecewise constant.
    if not ctx.needs_input_grad[0]:
        return (None,) * 7
    (actions,) = ctx.saved_tensors
    patch_size, std = ctx.args
    _, dtype, _, (h, w) = ctx.meta
    compute = C.compute_dtype(dtype)
    n, p = grad_out.shape[0], patch_size
    corner = focus_corners(actions, h, p).long()
    corner = torch.stack([corner[:, 0].clamp(0, h - p), corner[:, 1].clamp(0, w - p)], 1)
    idx = torch.arange(p, device=grad_out.device)
    rows = (corner[:, 0:1] + idx).view(n, 1, p, 1)
    cols = (corner[:, 1:2] + idx).view(n, 1, 1, p)
    grad = torch.zeros((n, 3, h, w), dtype=compute, device=grad_out.device)
    grad[torch.arange(n, device=grad.device).view(n, 1, 1, 1), torch.arange(3, device=grad.device).view(1, 3, 1, 1),
         rows, cols] = C.unnormalise_grad(grad_out, std, compute)
    return (C.to_images_layout(grad, ctx.meta),) + (None,) * 6


_focus_crop_op.register_autograd(_backward, setup_context=_setup_context)


def focus_crop(images: torch.Tensor, actions: torch.Tensor, patch_size: int, mean: Optional[Sequence[float]] = None,
               std: Optional[Sequence[float]] = None, out_dtype: Optional[torch.dtype] = None,
               channels_last: bool = False, backend: Optional[str] = None, validate: bool = True) -> torch.Tensor:
    """The focus crop: a P x P patch of each full-resolution image, top-left corner ``floor(a * (S - P))``.

    images: Tensor[N, 3, S, S] or Tensor[N, S, S, 3], uint8 or float, square, any strides.
    actions: Tensor[N, 2] float in [0, 1] on the images' device: a[:, 0] picks the row, a[:, 1] the column, as
        GFNet's policy emits them; the corner is :func:`focus_corners` (in the actions' dtype, as the reference).
    patch_size: P, 1 <= P <= S. mean, std: 3 values in [0, 1] units, or None.
    out_dtype: default float32 for uint8 images, else the images' dtype. channels_last: output memory format.
    backend: None (the device decides), or "triton", "cpp", "torch" to force one (tests, benchmarks; see
        :func:`gfnet.ops.select_backend`).
    validate: check that the actions lie in [0, 1] without NaN (a host sync on CUDA; skipped under
        torch.compile). Unvalidated corners are clamped into the image, never read outside it.
    Returns Tensor[N, 3, P, P] on the images' device. For float images without normalisation the values are
    bit-identical to the reference's crops on every backend. Gradient: to float images (the patch gradient
    scattered back); none to the actions (the corner is piecewise constant in them).
    """
    x = C.check_images(images)
    if x.shape[2] != x.shape[3]:
        raise ValueError(f"focus_crop needs square images (the corner is floor(a * (S - P)) with one S); "
                         f"got {x.shape[2]}x{x.shape[3]}")
    patch_size = C.check_patch(patch_size, x.shape[2], x.shape[3])
    C.check_positions("actions", actions, x.shape[0], images, validate)
    mean, std = C.check_norm(mean, std)
    args = (images, actions, patch_size, mean, std, C.out_dtype_for(images, out_dtype), bool(channels_last))
    if backend is None:
        return _focus_crop_op(*args)
    select_backend(images, backend)  # refuse now, with the reason
    with use_backend(backend):
        return _focus_crop_op(*args)
