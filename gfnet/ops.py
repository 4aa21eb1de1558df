"""Glance and focus operators: the fused, batched image ops of every GFNet step.

- ``glance_resize``: the glance (step 1; Wang et al., NeurIPS 2020, Sec. 3.2): the whole image resized to
  P x P with ``align_corners=True`` (bicubic or bilinear).
- ``focus_crop``: the focus (steps 2..T): a P x P integer crop whose top-left corner is
  ``floor(a * (S - P))`` (a[:, 0] the row, a[:, 1] the column), as the reference code crops.
- ``focus_crop_bilinear``: a crop at a fractional position by bilinear sampling, differentiable in the images
  and the positions (AdaFocusV2's crop, for end-to-end variants).

Each op fuses what an input pipeline needs in one pass over the pixels: uint8 input (straight from DALI)
divided by 255, or float input; the layout read from the tensor (``Tensor[N, 3, H, W]``, or
``Tensor[N, H, W, 3]`` as DALI hands out HWC batches; a shape that fits both is taken as NCHW); then
``(x - mean) / std`` with mean and std in [0, 1] units as torchvision's Normalize takes them (None: no
normalisation); output float32, bfloat16, float16 or float64, in NCHW or channels-last memory format.
Computation is in float32 (float64 for float64 images).

Backends (``backend=``): "triton" (the kernels of gfnet.kernels; CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1), "cpp" (gfnet._C, CPU tensors, OpenMP) and "torch" (the plain-PyTorch references that
define the ops). None picks Triton for CUDA tensors and C++ for CPU tensors; ``select_backend`` is the one
place that decides and explains a refusal. The ops are registered with torch.library as
``gfnet::glance_resize``, ``gfnet::focus_crop`` and ``gfnet::focus_crop_bilinear`` (with fake
implementations and autograd), so torch.compile and torch.export see them as single nodes. Triton is
imported only when a Triton or reference path first runs.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import operator
import os
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BACKENDS = ("triton", "cpp", "torch")
_FLOAT_OUT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_IN_DTYPES = (torch.uint8, torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ------------------------------------------------------------------------------------------------- dispatch

_probed = {}  # memo of the probes below (a plain dict: torch.compile traces through it without warnings)


def _cpp_extension():
    """gfnet._C, or the ImportError that explains why it is missing."""
    if "cpp" not in _probed:
        try:
            from gfnet import _C
            if not hasattr(_C, "focus_crop"):
                raise ImportError("gfnet._C was built without the crop kernels (csrc/crop.cpp); rebuild it")
            _probed["cpp"] = _C
        except ImportError as err:
            _probed["cpp"] = err
    return _probed["cpp"]


def _triton_installed() -> bool:
    if "triton" not in _probed:
        _probed["triton"] = importlib.util.find_spec("triton") is not None
    return _probed["triton"]


_warned_fallback = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned_fallback:
        _warned_fallback.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def select_backend(images: torch.Tensor, backend: Optional[str] = None) -> str:
    """The backend that runs an op on ``images``: "triton", "cpp" or "torch".

    backend=None chooses: Triton for CUDA tensors, gfnet._C for CPU tensors, the PyTorch reference for other
    devices or when the fast path is not installed (with a warning, once). A forced backend that cannot run
    raises a RuntimeError saying why and what to do instead.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None; got {backend!r}")
    device = images.device
    if backend is None:
        if device.type == "cuda":
            if _triton_installed():
                return "triton"
            _warn_once("triton", "Triton is not installed, so gfnet's glance/focus ops run the slower PyTorch "
                                 "reference on CUDA; `pip install triton` for the fused kernels")
            return "torch"
        if device.type == "cpu":
            ext = _cpp_extension()
            if not isinstance(ext, ImportError):
                return "cpp"
            _warn_once("cpp", f"gfnet._C is not available ({ext}), so gfnet's glance/focus ops run the slower "
                              "PyTorch reference on the CPU; rebuild it with "
                              "`pip install --no-build-isolation -e .` (needs a C++ compiler)")
            return "torch"
        return "torch"
    if backend == "triton":
        if not _triton_installed():
            raise RuntimeError("backend='triton' needs the triton package: `pip install triton`")
        if device.type == "cuda":
            return "triton"
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            return "triton"
        raise RuntimeError(f"Triton needs a CUDA tensor; got {device.type} (set TRITON_INTERPRET=1 before "
                           "triton is imported to run it in the interpreter, or use backend='cpp' or 'torch')")
    if backend == "cpp":
        if device.type != "cpu":
            raise RuntimeError(f"gfnet._C has CPU kernels only; got a {device.type} tensor (use "
                               "backend='triton' or 'torch', or backend=None to choose)")
        ext = _cpp_extension()
        if isinstance(ext, ImportError):
            raise RuntimeError(f"backend='cpp' needs gfnet._C, which failed to import ({ext}); rebuild it with "
                               "`pip install --no-build-isolation -e .`, or use backend='torch'")
        return "cpp"
    return "torch"


def _kernel(name: str):
    # Lazy: importing a kernel module imports Triton (seconds, and a CUDA probe).
    return importlib.import_module(f"gfnet.kernels.{name}")


# ------------------------------------------------------------------------------------------------- checks

def _as_nchw(images: torch.Tensor) -> torch.Tensor:
    """Tensor[N, 3, H, W] or Tensor[N, H, W, 3] -> the Tensor[N, 3, H, W] view (no copy)."""
    if images.dim() != 4:
        raise ValueError("images must be Tensor[N, 3, H, W] or Tensor[N, H, W, 3]; "
                         f"got rank {images.dim()}, shape {tuple(images.shape)}")
    if images.shape[1] == 3:
        return images
    if images.shape[3] == 3:
        return images.permute(0, 3, 1, 2)
    raise ValueError("images must have 3 channels, as Tensor[N, 3, H, W] or Tensor[N, H, W, 3]; "
                     f"got shape {tuple(images.shape)}")


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor; got {type(images).__name__}")
    x = _as_nchw(images)
    if images.dtype not in _IN_DTYPES:
        raise TypeError(f"images must be uint8 or float (float16/bfloat16/float32/float64); got {images.dtype}")
    return x


def _check_norm(mean, std) -> Tuple[Optional[List[float]], Optional[List[float]]]:
    if mean is None and std is None:
        return None, None
    if mean is None or std is None:
        raise ValueError("give both mean and std (in [0, 1] units, 3 values each), or neither")
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values each (one per channel); got {len(mean)} and {len(std)}")
    if any(s == 0.0 for s in std):
        raise ValueError(f"std must not contain 0; got {std}")
    return mean, std


def _out_dtype(images: torch.Tensor, out_dtype: Optional[torch.dtype]) -> torch.dtype:
    if out_dtype is None:
        return images.dtype if images.dtype.is_floating_point else torch.float32
    if out_dtype not in _FLOAT_OUT:
        raise TypeError(f"out_dtype must be one of float32, bfloat16, float16, float64; got {out_dtype}")
    return out_dtype


def _check_positions(name: str, positions: torch.Tensor, n: int, validate: bool) -> None:
    if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.shape[1] != 2:
        shape = tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise ValueError(f"{name} must be Tensor[N, 2] (row, column); got {shape}")
    if positions.shape[0] != n:
        raise ValueError(f"batch mismatch: images hold {n} samples, {name} {positions.shape[0]}")
    if not positions.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float tensor in [0, 1]; got {positions.dtype}")
    # The value check reads the tensor back to the host: free on the CPU, a synchronisation on a GPU (pass
    # validate=False in a hot loop whose positions are in range by construction). It cannot run inside a
    # torch.compile graph; there, and with validate=False, the kernels clamp to the image instead.
    if validate and not torch.compiler.is_compiling() and positions.numel() > 0:
        inside = (positions >= 0) & (positions <= 1)  # False for NaN too
        if not bool(inside.all()):
            bad = positions[~inside]
            raise ValueError(f"{name} must lie in [0, 1] with no NaN; got {bad.numel()} value(s) outside, "
                             f"e.g. {bad[:4].tolist()}")


def _check_size(name: str, value) -> int:
    try:
        value = operator.index(value)  # ints, numpy ints, 0-d integer tensors; not floats
    except TypeError:
        raise TypeError(f"{name} must be an int; got {type(value).__name__}") from None
    if value < 1:
        raise ValueError(f"{name} must be positive; got {value}")
    return value


def _check_patch(patch_size, h: int, w: int) -> int:
    patch_size = _check_size("patch_size", patch_size)
    if patch_size > h or patch_size > w:
        raise ValueError(f"patch_size {patch_size} is larger than the {h}x{w} image")
    return patch_size


# ------------------------------------------------------------------------------------------------- kernels' constants

@functools.lru_cache(maxsize=64)
def _params(mean: Optional[Tuple[float, ...]], std: Optional[Tuple[float, ...]], extra: Tuple[float, ...],
            dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # The Triton kernels read mean, std (and the bilinear crop's scale) from memory: Python floats reach
    # Triton as float32 scalars, which would round a float64 computation. Cached so that a CUDA call does
    # not copy them to the device (a host synchronisation) every time.
    values = list(mean or (0.0, 0.0, 0.0)) + list(std or (1.0, 1.0, 1.0)) + list(extra)
    return torch.tensor(values, dtype=dtype, device=device)


def _compute_dtype(images: torch.Tensor) -> torch.dtype:
    return torch.float64 if images.dtype == torch.float64 else torch.float32


def _empty_out(x: torch.Tensor, size: int, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((x.shape[0], 3, size, size), dtype=dtype, device=x.device, memory_format=fmt)


def _key(v):
    return tuple(v) if v is not None else None


# ------------------------------------------------------------------------------------------------- focus_crop

@torch.library.custom_op("gfnet::focus_crop", mutates_args=())
def _focus_crop_op(images: torch.Tensor, actions: torch.Tensor, patch_size: int, mean: Optional[List[float]],
                   std: Optional[List[float]], out_dtype: torch.dtype, channels_last: bool,
                   backend: str) -> torch.Tensor:
    x = _as_nchw(images)
    out = _empty_out(x, patch_size, out_dtype, channels_last)
    if backend == "torch":
        return out.copy_(_kernel("focus_crop").focus_crop_ref(x, actions, patch_size, mean, std, out_dtype))
    # The corner exactly as the reference computes it (in the actions' dtype), without leaving the device.
    corners = torch.floor(actions * (x.shape[2] - patch_size)).to(torch.int32).contiguous()
    if backend == "cpp":
        return _cpp_extension().focus_crop(x, corners, out, mean, std)
    norm = _params(_key(mean), _key(std), (), _compute_dtype(x), x.device) if mean is not None else None
    return _kernel("focus_crop").focus_crop_triton(x, corners, out, norm)


@_focus_crop_op.register_fake
def _(images, actions, patch_size, mean, std, out_dtype, channels_last, backend):
    return _empty_out(_as_nchw(images), patch_size, out_dtype, channels_last)


def _images_meta(images: torch.Tensor):
    # What a backward needs to rebuild d images: shape, dtype, whether HWC, (H, W).
    hwc = images.shape[1] != 3
    hw = (images.shape[1], images.shape[2]) if hwc else (images.shape[2], images.shape[3])
    return images.shape, images.dtype, hwc, hw


def _to_images_layout(grad_nchw: torch.Tensor, meta) -> torch.Tensor:
    shape, dtype, hwc, _ = meta
    g = grad_nchw.permute(0, 2, 3, 1) if hwc else grad_nchw
    return g.to(dtype).contiguous()


def _unnormalise_grad(grad: torch.Tensor, std, compute: torch.dtype) -> torch.Tensor:
    # d/dx of (x - mean) / std is 1 / std per channel (uint8 inputs carry no gradient, so no 1/255).
    g = grad.to(compute)
    if std is not None:
        g = g / torch.tensor(std, dtype=compute, device=g.device).view(1, 3, 1, 1)
    return g


def _focus_crop_setup_context(ctx, inputs, output):
    images, actions, patch_size, mean, std, out_dtype, channels_last, backend = inputs
    ctx.meta = _images_meta(images)
    ctx.save_for_backward(actions)
    ctx.args = (patch_size, std)


def _focus_crop_backward(ctx, grad_out):
    # The crop's adjoint: the (normalisation-scaled) patch gradient scattered back to the corner that the
    # forward read, clamped as the kernels clamp. The actions get none: the corner is piecewise constant.
    if not ctx.needs_input_grad[0]:
        return (None,) * 8
    (actions,) = ctx.saved_tensors
    patch_size, std = ctx.args
    shape, dtype, _, (h, w) = ctx.meta
    n, p = shape[0], patch_size
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    corner = torch.floor(actions * (h - p)).long().clamp(0, h - p)
    idx = torch.arange(p, device=grad_out.device)
    rows = (corner[:, 0:1] + idx).view(n, 1, p, 1)
    cols = (corner[:, 1:2] + idx).view(n, 1, 1, p)
    grad = torch.zeros((n, 3, h, w), dtype=compute, device=grad_out.device)
    grad[torch.arange(n, device=grad.device).view(n, 1, 1, 1), torch.arange(3, device=grad.device).view(1, 3, 1, 1),
         rows, cols] = _unnormalise_grad(grad_out, std, compute)
    return (_to_images_layout(grad, ctx.meta),) + (None,) * 7


_focus_crop_op.register_autograd(_focus_crop_backward, setup_context=_focus_crop_setup_context)


def focus_crop(images: torch.Tensor, actions: torch.Tensor, patch_size: int, mean: Optional[Sequence[float]] = None,
               std: Optional[Sequence[float]] = None, out_dtype: Optional[torch.dtype] = None,
               channels_last: bool = False, backend: Optional[str] = None, validate: bool = True) -> torch.Tensor:
    """The focus crop: a P x P patch of each full-resolution image, top-left corner ``floor(a * (S - P))``.

    images: Tensor[N, 3, S, S] or Tensor[N, S, S, 3], uint8 or float, square, any strides.
    actions: Tensor[N, 2] float in [0, 1]: a[:, 0] picks the row, a[:, 1] the column, as GFNet's policy emits
        them; the corner is ``torch.floor(actions * (S - P)).int()`` in the actions' dtype, as the reference.
    patch_size: P, 1 <= P <= S. mean, std: 3 values in [0, 1] units, or None.
    out_dtype: default float32 for uint8 images, else the images' dtype. channels_last: output memory format.
    backend: None, "triton", "cpp" or "torch" (see ``select_backend``).
    validate: check that the actions lie in [0, 1] without NaN (a host sync on CUDA; skipped under
        torch.compile). Unvalidated corners are clamped into the image, never read outside it.
    Returns Tensor[N, 3, P, P] on the images' device. For float images without normalisation the values are
    bit-identical to the reference's crops on every backend. Gradient: to float images (the patch gradient
    scattered back); none to the actions (the corner is piecewise constant in them).
    """
    x = _check_images(images)
    if x.shape[2] != x.shape[3]:
        raise ValueError(f"focus_crop needs square images (the corner is floor(a * (S - P)) with one S); "
                         f"got {x.shape[2]}x{x.shape[3]}")
    patch_size = _check_patch(patch_size, x.shape[2], x.shape[3])
    _check_positions("actions", actions, x.shape[0], validate)
    if actions.device != images.device:
        raise ValueError(f"actions are on {actions.device} but images on {images.device}")
    mean, std = _check_norm(mean, std)
    return _focus_crop_op(images, actions, patch_size, mean, std, _out_dtype(images, out_dtype),
                          bool(channels_last), select_backend(images, backend))


# ------------------------------------------------------------------------------------------------- glance_resize

@torch.library.custom_op("gfnet::glance_resize", mutates_args=())
def _glance_resize_op(images: torch.Tensor, size: int, mode: str, mean: Optional[List[float]],
                      std: Optional[List[float]], out_dtype: torch.dtype, channels_last: bool,
                      backend: str) -> torch.Tensor:
    x = _as_nchw(images)
    out = _empty_out(x, size, out_dtype, channels_last)
    if backend == "torch":
        return out.copy_(_kernel("glance_resize").glance_resize_ref(x, size, mode, mean, std, out_dtype))
    if backend == "cpp":
        return _cpp_extension().glance_resize(x, out, mode == "bicubic", mean, std)
    norm = _params(_key(mean), _key(std), (), _compute_dtype(x), x.device) if mean is not None else None
    return _kernel("glance_resize").glance_resize_triton(x, out, mode, norm)


@_glance_resize_op.register_fake
def _(images, size, mode, mean, std, out_dtype, channels_last, backend):
    return _empty_out(_as_nchw(images), size, out_dtype, channels_last)


def _glance_resize_setup_context(ctx, inputs, output):
    images, size, mode, mean, std, out_dtype, channels_last, backend = inputs
    ctx.meta = _images_meta(images)
    ctx.args = (size, mode, std)


def _glance_resize_backward(ctx, grad_out):
    # The interpolation is separable, out = Wy @ x @ Wx^T with Wy: [P, H] and Wx: [P, W] (each row the taps
    # of one output row/column), so its adjoint is Wy^T @ g @ Wx. The matrices are the interpolation of an
    # identity image along one axis (the other axis keeps its size, where align_corners=True is exact).
    if not ctx.needs_input_grad[0]:
        return (None,) * 8
    size, mode, std = ctx.args
    shape, dtype, _, (h, w) = ctx.meta
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    g = _unnormalise_grad(grad_out, std, compute)

    def weights(n):  # Tensor[size, n]
        eye = torch.eye(n, dtype=compute, device=g.device).view(1, 1, n, n)
        return F.interpolate(eye, size=(size, n), mode=mode, align_corners=True).view(size, n)

    grad = torch.einsum("ph,ncpq,qw->nchw", weights(h), g, weights(w))
    return (_to_images_layout(grad, ctx.meta),) + (None,) * 7


_glance_resize_op.register_autograd(_glance_resize_backward, setup_context=_glance_resize_setup_context)


def glance_resize(images: torch.Tensor, size: int, mode: str = "bicubic", mean: Optional[Sequence[float]] = None,
                  std: Optional[Sequence[float]] = None, out_dtype: Optional[torch.dtype] = None,
                  channels_last: bool = False, backend: Optional[str] = None) -> torch.Tensor:
    """The glance: every image resized to size x size, as ``F.interpolate(x, (size, size), mode=mode,
    align_corners=True)`` defines it (bicubic: A = -0.75, border-clamped taps; no antialiasing, as the
    reference), followed by the normalisation.

    images: Tensor[N, 3, H, W] or Tensor[N, H, W, 3], uint8 or float, any strides (H, W need not be square).
    size: the output side P >= 1. mode: "bicubic" or "bilinear". mean, std: 3 values in [0, 1] units, or None.
    out_dtype: default float32 for uint8 images, else the images' dtype. channels_last: output memory format.
    backend: None, "triton", "cpp" or "torch" (see ``select_backend``).
    Returns Tensor[N, 3, size, size] on the images' device, equal to the reference up to float rounding
    (the kernels interpolate the raw values and normalise once per output pixel). Gradient: to float images
    (the interpolation's adjoint).
    """
    _check_images(images)
    size = _check_size("size", size)
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"mode must be 'bicubic' or 'bilinear'; got {mode!r}")
    mean, std = _check_norm(mean, std)
    return _glance_resize_op(images, size, mode, mean, std, _out_dtype(images, out_dtype), bool(channels_last),
                             select_backend(images, backend))


# ------------------------------------------------------------------------------------------------- focus_crop_bilinear

@torch.library.custom_op("gfnet::focus_crop_bilinear", mutates_args=())
def _focus_crop_bilinear_op(images: torch.Tensor, centers: torch.Tensor, patch_size: int, scale: float,
                            mean: Optional[List[float]], std: Optional[List[float]], out_dtype: torch.dtype,
                            channels_last: bool, backend: str) -> torch.Tensor:
    x = _as_nchw(images)
    out = _empty_out(x, patch_size, out_dtype, channels_last)
    if backend == "torch":
        ref = _kernel("focus_crop_bilinear").focus_crop_bilinear_ref
        return out.copy_(ref(x, centers, patch_size, scale, mean, std, out_dtype))
    compute = _compute_dtype(x)
    c = centers.to(compute).contiguous()
    if backend == "cpp":
        return _cpp_extension().focus_crop_bilinear(x, c, out, scale, mean, std)
    params = _params(_key(mean), _key(std), (float(scale),), compute, x.device)
    return _kernel("focus_crop_bilinear").focus_crop_bilinear_triton(x, c, params, out, mean is not None)


@_focus_crop_bilinear_op.register_fake
def _(images, centers, patch_size, scale, mean, std, out_dtype, channels_last, backend):
    return _empty_out(_as_nchw(images), patch_size, out_dtype, channels_last)


@torch.library.custom_op("gfnet::focus_crop_bilinear_backward", mutates_args=())
def _focus_crop_bilinear_backward_op(grad_out: torch.Tensor, images: torch.Tensor, centers: torch.Tensor,
                                     patch_size: int, scale: float, mean: Optional[List[float]],
                                     std: Optional[List[float]], backend: str, need_images: bool,
                                     need_centers: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(d images, d centers) of the bilinear crop by the "cpp" or "triton" kernels; an empty tensor stands for
    a gradient not asked for. (The "torch" backend differentiates its reference with autograd instead, which
    cannot run below the autograd dispatch key where this op's implementation runs.)"""
    if backend not in ("cpp", "triton"):
        raise ValueError(f"gfnet::focus_crop_bilinear_backward runs the 'cpp' or 'triton' kernels; got {backend!r}")
    x = _as_nchw(images)
    compute = _compute_dtype(x)
    c = centers.to(compute).contiguous()
    # Accumulators in the compute dtype, laid out like the images (an HWC batch gets an HWC gradient).
    gi_buf = torch.zeros(images.shape, dtype=compute, device=x.device) if need_images else None
    gc_buf = torch.zeros((x.shape[0], 2), dtype=compute, device=x.device) if need_centers else None
    gi_view = _as_nchw(gi_buf) if need_images else None
    if backend == "cpp":
        _cpp_extension().focus_crop_bilinear_backward(grad_out, x, c, scale, mean, std, gi_view, gc_buf)
    else:
        params = _params(_key(mean), _key(std), (float(scale),), compute, x.device)
        _kernel("focus_crop_bilinear").focus_crop_bilinear_backward_triton(
            grad_out, x, c, params, mean is not None, gi_view, gc_buf)
    gi = gi_buf.to(images.dtype) if need_images else images.new_empty(0)
    gc = gc_buf.to(centers.dtype) if need_centers else centers.new_empty(0)
    return gi, gc


@_focus_crop_bilinear_backward_op.register_fake
def _(grad_out, images, centers, patch_size, scale, mean, std, backend, need_images, need_centers):
    gi = torch.empty_like(images, memory_format=torch.contiguous_format) if need_images else images.new_empty(0)
    gc = torch.empty_like(centers, memory_format=torch.contiguous_format) if need_centers else centers.new_empty(0)
    return gi, gc


def _bilinear_backward_ref(grad_out, images, centers, patch_size, scale, mean, std, need_images, need_centers):
    # The reference's gradient: autograd through F.grid_sample.
    ref = _kernel("focus_crop_bilinear").focus_crop_bilinear_ref
    with torch.enable_grad():
        xi = images.detach().requires_grad_(need_images)
        ci = centers.detach().requires_grad_(need_centers)
        out = ref(_as_nchw(xi), ci, patch_size, scale, mean, std, _compute_dtype(images))
        wanted = [t for t, need in ((xi, need_images), (ci, need_centers)) if need]
        grads = list(torch.autograd.grad(out, wanted, grad_out.to(out.dtype))) if wanted else []
    gi = grads.pop(0).to(images.dtype) if need_images else None
    gc = grads.pop(0).to(centers.dtype) if need_centers else None
    return gi, gc


def _bilinear_setup_context(ctx, inputs, output):
    images, centers, patch_size, scale, mean, std, _out_dtype, _channels_last, backend = inputs
    ctx.save_for_backward(images, centers)
    ctx.args = (patch_size, scale, mean, std, backend)


def _bilinear_backward(ctx, grad_out):
    images, centers = ctx.saved_tensors
    patch_size, scale, mean, std, backend = ctx.args
    need_images = ctx.needs_input_grad[0] and images.dtype.is_floating_point
    need_centers = ctx.needs_input_grad[1]
    if backend == "torch":
        gi, gc = _bilinear_backward_ref(grad_out, images, centers, patch_size, scale, mean, std, need_images,
                                        need_centers)
    else:
        gi, gc = _focus_crop_bilinear_backward_op(grad_out, images, centers, patch_size, scale, mean, std,
                                                  backend, need_images, need_centers)
    return (gi if need_images else None, gc if need_centers else None,
            None, None, None, None, None, None, None)


_focus_crop_bilinear_op.register_autograd(_bilinear_backward, setup_context=_bilinear_setup_context)


def focus_crop_bilinear(images: torch.Tensor, centers: torch.Tensor, patch_size: int, scale: float = 1.0,
                        mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                        out_dtype: Optional[torch.dtype] = None, channels_last: bool = False,
                        backend: Optional[str] = None, validate: bool = True) -> torch.Tensor:
    """A differentiable crop at fractional positions (AdaFocusV2, Wang et al., ICCV 2021, Sec. 3.3).

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
    backward accumulates with atomics (deterministic up to float addition order); the C++ one is
    deterministic.
    """
    x = _check_images(images)
    if x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"focus_crop_bilinear needs images of at least 2x2 pixels; got {x.shape[2]}x{x.shape[3]}")
    patch_size = _check_patch(patch_size, x.shape[2], x.shape[3])
    _check_positions("centers", centers, x.shape[0], validate)
    if centers.device != images.device:
        raise ValueError(f"centers are on {centers.device} but images on {images.device}")
    scale = float(scale)
    if not scale > 0 or scale == float("inf"):
        raise ValueError(f"scale must be a positive finite float; got {scale}")
    mean, std = _check_norm(mean, std)
    return _focus_crop_bilinear_op(images, centers, patch_size, scale, mean, std, _out_dtype(images, out_dtype),
                                   bool(channels_last), select_backend(images, backend))
