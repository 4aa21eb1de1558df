"""Glance and focus operators: the fused, batched image ops of every GFNet step.

- :func:`glance_resize` (``gfnet::glance_resize``): the glance, the whole image resized to P x P with
  ``align_corners=True`` (bicubic or bilinear);
- :func:`focus_crop` (``gfnet::focus_crop``): the focus, a P x P integer crop at ``floor(a * (S - P))``
  (:func:`focus_corners`), as the reference code crops;
- :func:`focus_crop_bilinear` (``gfnet::focus_crop_bilinear``): a crop at a fractional position by bilinear
  sampling, differentiable in the images and the positions (AdaFocusV2's crop, for end-to-end variants).

Each op fuses what an input pipeline needs in one pass over the pixels: uint8 input (straight from DALI)
divided by 255, or float input; the layout read from the tensor (``Tensor[N, 3, H, W]``, or
``Tensor[N, H, W, 3]`` as DALI hands out HWC batches); ``(x - mean) / std`` with mean and std in [0, 1] units
as torchvision's Normalize takes them (None: no normalisation); output float32, bfloat16, float16 or float64,
in NCHW or channels-last memory format. Computation is in float32 (float64 for float64 images).

One file per op (gfnet/ops/<op>.py: schema, per-device kernels, fake, autograd, public function), with its
Triton kernel and plain-PyTorch reference in kernels/<op>.py and its C++ kernel in csrc/<op>.cpp. Which kernel
runs is decided in one place, :mod:`gfnet.ops._dispatch` (:func:`select_backend`, :func:`use_backend`).
"""
from gfnet.ops._checks import keep_kernel_params
from gfnet.ops._dispatch import BACKENDS, select_backend, use_backend
from gfnet.ops.focus_crop import focus_corners, focus_crop
from gfnet.ops.focus_crop_bilinear import focus_crop_bilinear
from gfnet.ops.glance_resize import glance_resize

__all__ = ["BACKENDS", "focus_corners", "focus_crop", "focus_crop_bilinear", "glance_resize", "keep_kernel_params",
           "select_backend", "use_backend"]
