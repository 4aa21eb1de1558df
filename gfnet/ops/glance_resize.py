"""gfnet::glance_resize, the glance (Wang et al., NeurIPS 2020, Sec. 3.2): every image resized to P x P as
``F.interpolate(x, (P, P), mode=mode, align_corners=True)`` defines it, fused with uint8 -> float,
normalisation, output dtype and layout.

Kernels (see gfnet.ops._dispatch): gfnet._C on the CPU, kernels/glance_resize.py's Triton kernel on CUDA, its
plain-PyTorch reference ``glance_resize_ref`` elsewhere and under ``use_backend("torch")``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from gfnet.kernels.reference import glance_resize_ref
from gfnet.ops import _checks as C
from gfnet.ops._dispatch import cpu_kernels, register_kernels, select_backend, triton_kernels, use_backend

__all__ = ["glance_resize"]

MODES = ("bicubic", "bilinear")


def _run(backend: str, images, size, mode, mean, std, out_dtype, channels_last) -> torch.Tensor:
    x = C.as_nchw(images)
    out = C.empty_out(x, size, out_dtype, channels_last)
    if backend == "torch":
        return out.copy_(glance_resize_ref(x, size, mode, mean, std, out_dtype))
    if backend == "cpp":
        return cpu_kernels().glance_resize(x, out, mode == "bicubic", mean, std)
    norm = C.kernel_params(mean, std, (), C.compute_dtype(x), x.device) if mean is not None else None
    return triton_kernels("glance_resize").glance_resize_triton(x, out, mode, norm)


@torch.library.custom_op("gfnet::glance_resize", mutates_args=())
def _glance_resize_op(images: torch.Tensor, size: int, mode: str, mean: Optional[List[float]],
                      std: Optional[List[float]], out_dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    # Devices without a kernel of their own: the reference.
    return _run("torch", images, size, mode, mean, std, out_dtype, channels_last)


register_kernels(_glance_resize_op, _run)


@_glance_resize_op.register_fake
def _(images, size, mode, mean, std, out_dtype, channels_last):
    return C.empty_out(C.as_nchw(images), size, out_dtype, channels_last)


def _setup_context(ctx, inputs, output):
    images, size, mode, mean, std, out_dtype, channels_last = inputs
    ctx.meta = C.images_meta(images)
    ctx.args = (size, mode, std)


def _backward(ctx, grad_out):
    # The interpolation is separable, out = Wy @ x @ Wx^T with Wy: [P, H] and Wx: [P, W] (each row the taps
    # of one output row/column), so its adjoint is Wy^T @ g @ Wx. The matrices are the interpolation of an
    # identity image along one axis (the other axis keeps its size, where align_corners=True is exact).
    if not ctx.needs_input_grad[0]:
        return (None,) * 7
    size, mode, std = ctx.args
    _, dtype, _, (h, w) = ctx.meta
    compute = C.compute_dtype(dtype)
    g = C.unnormalise_grad(grad_out, std, compute)

    def weights(n):  # Tensor[size, n]
        eye = torch.eye(n, dtype=compute, device=g.device).view(1, 1, n, n)
        return F.interpolate(eye, size=(size, n), mode=mode, align_corners=True).view(size, n)

    grad = torch.einsum("ph,ncpq,qw->nchw", weights(h), g, weights(w))
    return (C.to_images_layout(grad, ctx.meta),) + (None,) * 6


_glance_resize_op.register_autograd(_backward, setup_context=_setup_context)


def glance_resize(images: torch.Tensor, size: int, mode: str = "bicubic", mean: Optional[Sequence[float]] = None,
                  std: Optional[Sequence[float]] = None, out_dtype: Optional[torch.dtype] = None,
                  channels_last: bool = False, backend: Optional[str] = None) -> torch.Tensor:
    """The glance: every image resized to size x size, as ``F.interpolate(x, (size, size), mode=mode,
    align_corners=True)`` defines it (bicubic: A = -0.75, border-clamped taps; no antialiasing, as the
    reference), followed by the normalisation.

    images: Tensor[N, 3, H, W] or Tensor[N, H, W, 3], uint8 or float, any strides (H, W need not be square).
    size: the output side P >= 1. mode: "bicubic" or "bilinear". mean, std: 3 values in [0, 1] units, or None.
    out_dtype: default float32 for uint8 images, else the images' dtype. channels_last: output memory format.
    backend: None (the device decides), or "triton", "cpp", "torch" to force one (tests, benchmarks).
    Returns Tensor[N, 3, size, size] on the images' device, equal to the reference up to float rounding
    (the kernels interpolate the raw values and normalise once per output pixel). Gradient: to float images
    (the interpolation's adjoint).
    """
    C.check_images(images)
    size = C.check_size("size", size)
    if mode not in MODES:
        raise ValueError(f"mode must be 'bicubic' or 'bilinear'; got {mode!r}")
    mean, std = C.check_norm(mean, std)
    args = (images, size, mode, mean, std, C.out_dtype_for(images, out_dtype), bool(channels_last))
    if backend is None:
        return _glance_resize_op(*args)
    select_backend(images, backend)
    with use_backend(backend):
        return _glance_resize_op(*args)
