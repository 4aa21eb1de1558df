"""gfnet::focus_crop_bilinear, a differentiable crop at fractional positions (AdaFocusV2, Wang et al.,
ICCV 2021, Sec. 3.3), and gfnet::focus_crop_bilinear_backward, its gradient kernels.

Kernels (see gfnet.ops._dispatch): gfnet._C on the CPU (forward and a deterministic backward),
kernels/focus_crop_bilinear.py's Triton kernels on CUDA (the backward scatters with atomics, which
``torch.use_deterministic_algorithms`` is told about), its plain-PyTorch reference ``focus_crop_bilinear_ref``
(differentiated by autograd) elsewhere and under ``use_backend("torch")``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from gfnet.kernels.reference import focus_crop_bilinear_ref
from gfnet.ops import _checks as C
from gfnet.ops._dispatch import (
    alert_not_deterministic,
    cpu_kernels,
    register_kernels,
    select_backend,
    triton_kernels,
    use_backend,
)

__all__ = ["focus_crop_bilinear"]


def _run(backend: str, images, centers, patch_size, scale, mean, std, out_dtype, channels_last) -> torch.Tensor:
    x = C.as_nchw(images)
    out = C.empty_out(x, patch_size, out_dtype, channels_last)
    if backend == "torch":
        return out.copy_(focus_crop_bilinear_ref(x, centers, patch_size, scale, mean, std, out_dtype))
    compute = C.compute_dtype(x)
    c = centers.to(compute).contiguous()
    if backend == "cpp":
        return cpu_kernels().focus_crop_bilinear(x, c, out, scale, mean, std)
    params = C.kernel_params(mean, std, (float(scale),), compute, x.device)
    return triton_kernels("focus_crop_bilinear").focus_crop_bilinear_triton(x, c, params, out, mean is not None)


@torch.library.custom_op("gfnet::focus_crop_bilinear", mutates_args=())
def _bilinear_op(images: torch.Tensor, centers: torch.Tensor, patch_size: int, scale: float,
                 mean: Optional[List[float]], std: Optional[List[float]], out_dtype: torch.dtype,
                 channels_last: bool) -> torch.Tensor:
    # Devices without a kernel of their own: the reference.
    return _run("torch", images, centers, patch_size, scale, mean, std, out_dtype, channels_last)


register_kernels(_bilinear_op, _run)


@_bilinear_op.register_fake
def _(images, centers, patch_size, scale, mean, std, out_dtype, channels_last):
    return C.empty_out(C.as_nchw(images), patch_size, out_dtype, channels_last)


def _run_backward(backend, grad_out, images, centers, scale, mean, std, need_images, need_centers):
    x = C.as_nchw(images)
    compute = C.compute_dtype(x)
    c = centers.to(compute).contiguous()
    # Accumulators in the compute dtype, laid out like the images (an HWC batch gets an HWC gradient).
    gi_buf = torch.zeros(images.shape, dtype=compute, device=x.device) if need_images else None
    gc_buf = torch.zeros((x.shape[0], 2), dtype=compute, device=x.device) if need_centers else None
    gi_view = C.as_nchw(gi_buf) if need_images else None
    if backend == "cpp":
        cpu_kernels().focus_crop_bilinear_backward(grad_out, x, c, scale, mean, std, gi_view, gc_buf)
    elif backend == "triton":
        # Neighbouring patch pixels share taps: the kernel scatters with atomic adds, whose float sums depend
        # on the order of arrival. Say so, as PyTorch's own nondeterministic kernels do (raises under
        # torch.use_deterministic_algorithms(True), warns with warn_only=True).
        alert_not_deterministic("gfnet::focus_crop_bilinear backward with the Triton kernel (atomic adds; the CPU "
                                "kernel is deterministic)")
        params = C.kernel_params(mean, std, (float(scale),), compute, x.device)
        triton_kernels("focus_crop_bilinear").focus_crop_bilinear_backward_triton(
            grad_out, x, c, params, mean is not None, gi_view, gc_buf)
    else:
        raise ValueError(f"gfnet::focus_crop_bilinear_backward runs the 'cpp' or 'triton' kernels; got {backend!r}")
    gi = gi_buf.to(images.dtype) if need_images else images.new_empty(0)
    gc = gc_buf.to(centers.dtype) if need_centers else centers.new_empty(0)
    return gi, gc


@torch.library.custom_op("gfnet::focus_crop_bilinear_backward", mutates_args=())
def _bilinear_backward_op(grad_out: torch.Tensor, images: torch.Tensor, centers: torch.Tensor, patch_size: int,
                          scale: float, mean: Optional[List[float]], std: Optional[List[float]], need_images: bool,
                          need_centers: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(d images, d centers) of the bilinear crop by the C++ or Triton kernels; an empty tensor stands for a
    gradient not asked for. (The reference differentiates with autograd instead, in the autograd formula.)"""
    raise RuntimeError(f"gfnet::focus_crop_bilinear_backward has kernels for CPU and CUDA tensors only; got "
                       f"{images.device.type}")


register_kernels(_bilinear_backward_op,
                 lambda backend, grad_out, images, centers, patch_size, scale, mean, std, need_images, need_centers:
                 _run_backward(backend, grad_out, images, centers, scale, mean, std, need_images, need_centers),
                 images_arg=1)


@_bilinear_backward_op.register_fake
def _(grad_out, images, centers, patch_size, scale, mean, std, need_images, need_centers):
    gi = torch.empty_like(images, memory_format=torch.contiguous_format) if need_images else images.new_empty(0)
    gc = torch.empty_like(centers, memory_format=torch.contiguous_format) if need_centers else centers.new_empty(0)
    return gi, gc


def _backward_ref(grad_out, images, centers, patch_size, scale, mean, std, need_images, need_centers):
    # The reference's gradient: autograd through F.grid_sample.
    with torch.enable_grad():
        xi = images.detach().requires_grad_(need_images)
        ci = centers.detach().requires_grad_(need_centers)
        out = focus_crop_bilinear_ref(C.as_nchw(xi), ci, patch_size, scale, mean, std, C.compute_dtype(images))
        wanted = [t for t, need in ((xi, need_images), (ci, need_centers)) if need]
        grads = list(torch.autograd.grad(out, wanted, grad_out.to(out.dtype))) if wanted else []
    gi = grads.pop(0).to(images.dtype) if need_images else None
    gc = grads.pop(0).to(centers.dtype) if need_centers else None
    return gi, gc


def _setup_context(ctx, inputs, output):
    images, centers, patch_size, scale, mean, std, _out_dtype, _channels_last = inputs
    ctx.save_for_backward(images, centers)
    ctx.args = (patch_size, scale, mean, std)
    # The forward's kernel, decided in the forward's thread (the backward may run in autograd's device thread,
    # where a use_backend override of the caller is not visible).
    ctx.backend = select_backend(images)


def _backward(ctx, grad_out):
    images, centers = ctx.saved_tensors
    patch_size, scale, mean, std = ctx.args
    need_images = ctx.needs_input_grad[0] and images.dtype.is_floating_point
    need_centers = ctx.needs_input_grad[1]
    if ctx.backend == "torch":
        gi, gc = _backward_ref(grad_out, images, centers, patch_size, scale, mean, std, need_images, need_centers)
    else:
        with use_backend(ctx.backend):
            gi, gc = _bilinear_backward_op(grad_out, images, centers, patch_size, scale, mean, std, need_images,
                                           need_centers)
    return (gi if need_images else None, gc if need_centers else None) + (None,) * 6


_bilinear_op.register_autograd(_backward, setup_context=_setup_context)


def focus_crop_bilinear(images: torch.Tensor, centers: torch.Tensor, patch_size: int, scale: float = 1.0,
                        mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                        out_dtype: Optional[torch.dtype] = None, channels_last: bool = False,
                        backend: Optional[str] = None, validate: bool = True) -> torch.Tensor:
    """A differentiable crop at fractional positions.

    Convention: ``centers[n] = (cy, cx)`` in [0, 1]^2 (row, column), normalised over the image so that 0 is
    the center of the first pixel and 1 that of the last. Patch pixel (i, j) samples the normalised image at
    ``y = cy * (H - 1) + (i - (P - 1) / 2) * scale`` and ``x = cx * (W - 1) + (j - (P - 1) / 2) * scale``
    (pixel-index coordinates) by bilinear interpolation, zero outside the image: the patch covers
    ``scale * P`` pixels; scale = 1 with an integer top-left corner gives exactly the integer crop. Equal to
    ``F.grid_sample(normalised_images, grid, align_corners=True, padding_mode="zeros")``.

    images: Tensor[N, 3, H, W] or Tensor[N, H, W, 3], uint8 or float, H, W >= 2, any strides.
    centers: Tensor[N, 2] float. patch_size: P <= min(H, W). scale: > 0. mean, std: 3 values or None.
    out_dtype, channels_last, backend: as ``focus_crop``. validate: check centers in [0, 1], no NaN (a host
    sync on CUDA; skipped under torch.compile).
    Returns Tensor[N, 3, P, P]. Backward (first order): to float images (in their dtype and shape) and to
    centers (not to scale); the derivative is one-sided at integer positions, as grid_sample's. Triton's
    backward accumulates with atomics (nondeterministic float addition order: it raises under
    ``torch.use_deterministic_algorithms(True)``); the C++ one is deterministic.
    """
    x = C.check_images(images)
    if x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"focus_crop_bilinear needs images of at least 2x2 pixels; got {x.shape[2]}x{x.shape[3]}")
    patch_size = C.check_patch(patch_size, x.shape[2], x.shape[3])
    C.check_positions("centers", centers, x.shape[0], images, validate)
    scale = float(scale)
    if not scale > 0 or scale == float("inf"):
        raise ValueError(f"scale must be a positive finite float; got {scale}")
    mean, std = C.check_norm(mean, std)
    args = (images, centers, patch_size, scale, mean, std, C.out_dtype_for(images, out_dtype), bool(channels_last))
    if backend is None:
        return _bilinear_op(*args)
    select_backend(images, backend)
    with use_backend(backend):
        return _bilinear_op(*args)
