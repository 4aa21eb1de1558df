"""Argument checks and small helpers shared by the ops of gfnet.ops: layouts, dtypes, normalisation
constants, positions and sizes. Each check raises with a message that says what was expected."""
from __future__ import annotations

import contextlib
import functools
import operator
import threading
from typing import Iterator, List, Optional, Tuple

import torch

from gfnet.kernels.reference import compute_dtype  # noqa: F401 (the ops' one definition, shared with the kernels)

FLOAT_OUT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
IN_DTYPES = (torch.uint8, torch.float32, torch.float16, torch.bfloat16, torch.float64)


def as_nchw(images: torch.Tensor) -> torch.Tensor:
    """Tensor[N, 3, H, W] or Tensor[N, H, W, 3] -> the Tensor[N, 3, H, W] view (no copy); a shape that fits
    both is taken as NCHW."""
    if images.dim() != 4:
        raise ValueError("images must be Tensor[N, 3, H, W] or Tensor[N, H, W, 3]; "
                         f"got rank {images.dim()}, shape {tuple(images.shape)}")
    if images.shape[1] == 3:
        return images
    if images.shape[3] == 3:
        return images.permute(0, 3, 1, 2)
    raise ValueError("images must have 3 channels, as Tensor[N, 3, H, W] or Tensor[N, H, W, 3]; "
                     f"got shape {tuple(images.shape)}")


def check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor; got {type(images).__name__}")
    x = as_nchw(images)
    if images.dtype not in IN_DTYPES:
        raise TypeError(f"images must be uint8 or float (float16/bfloat16/float32/float64); got {images.dtype}")
    return x


def check_norm(mean, std) -> Tuple[Optional[List[float]], Optional[List[float]]]:
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


def out_dtype_for(images: torch.Tensor, out_dtype: Optional[torch.dtype]) -> torch.dtype:
    if out_dtype is None:
        return images.dtype if images.dtype.is_floating_point else torch.float32
    if out_dtype not in FLOAT_OUT:
        raise TypeError(f"out_dtype must be one of float32, bfloat16, float16, float64; got {out_dtype}")
    return out_dtype


def check_positions(name: str, positions: torch.Tensor, n: int, images: torch.Tensor, validate: bool) -> None:
    if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.shape[1] != 2:
        shape = tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise ValueError(f"{name} must be Tensor[N, 2] (row, column); got {shape}")
    if positions.shape[0] != n:
        raise ValueError(f"batch mismatch: images hold {n} samples, {name} {positions.shape[0]}")
    if not positions.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float tensor in [0, 1]; got {positions.dtype}")
    if positions.device != images.device:
        raise ValueError(f"{name} are on {positions.device} but images on {images.device}")
    # The value check reads the tensor back to the host: free on the CPU, a synchronisation on a GPU (pass
    # validate=False in a hot loop whose positions are in range by construction). It cannot run inside a
    # torch.compile graph; there, and with validate=False, the kernels clamp to the image instead.
    if validate and not torch.compiler.is_compiling() and positions.numel() > 0:
        inside = (positions >= 0) & (positions <= 1)  # False for NaN too
        if not bool(inside.all()):
            bad = positions[~inside]
            raise ValueError(f"{name} must lie in [0, 1] with no NaN; got {bad.numel()} value(s) outside, "
                             f"e.g. {bad[:4].tolist()}")


def check_size(name: str, value) -> int:
    try:
        value = operator.index(value)  # ints, numpy ints, 0-d integer tensors; not floats
    except TypeError:
        raise TypeError(f"{name} must be an int; got {type(value).__name__}") from None
    if value < 1:
        raise ValueError(f"{name} must be positive; got {value}")
    return value


def check_patch(patch_size, h: int, w: int) -> int:
    patch_size = check_size("patch_size", patch_size)
    if patch_size > h or patch_size > w:
        raise ValueError(f"patch_size {patch_size} is larger than the {h}x{w} image")
    return patch_size



def empty_out(x: torch.Tensor, size: int, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((x.shape[0], 3, size, size), dtype=dtype, device=x.device, memory_format=fmt)


@functools.lru_cache(maxsize=64)
def _params(mean, std, extra, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    values = list(mean or (0.0, 0.0, 0.0)) + list(std or (1.0, 1.0, 1.0)) + list(extra)
    return torch.tensor(values, dtype=dtype, device=device)


_keepers = threading.local()


@contextlib.contextmanager
def keep_kernel_params(kept: dict) -> Iterator[dict]:
    """Inside the block, every tensor that :func:`kernel_params` hands out (in this thread) is also stored in
    ``kept`` (id -> tensor): its holder keeps it alive whatever the cache evicts. A CUDA graph reads these
    tensors by address, so whoever owns the graph (a plan of gfnet.engine) must own them too."""
    stack = _keepers.__dict__.setdefault("stack", [])
    stack.append(kept)
    try:
        yield kept
    finally:
        stack.pop()


def kernel_params(mean, std, extra: Tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Tensor[6 + len(extra)]: mean, std (and e.g. the bilinear crop's scale) for the Triton kernels, which
    read them from memory (Python floats reach Triton as float32 scalars, which would round a float64
    computation). Cached, so that a CUDA call does not copy them to the device (a host synchronisation) every
    time, and so that CUDA-graph capture finds them already on the device; the cache may drop a tensor, so a
    captured graph's owner keeps what it read (:func:`keep_kernel_params`)."""
    params = _params(tuple(mean) if mean is not None else None, tuple(std) if std is not None else None,
                     tuple(extra), dtype, device)
    for kept in getattr(_keepers, "stack", ()):
        kept[id(params)] = params
    return params


def images_meta(images: torch.Tensor):
    """What a backward needs to rebuild d images: shape, dtype, whether HWC, (H, W)."""
    hwc = images.shape[1] != 3
    hw = (images.shape[1], images.shape[2]) if hwc else (images.shape[2], images.shape[3])
    return images.shape, images.dtype, hwc, hw


def to_images_layout(grad_nchw: torch.Tensor, meta) -> torch.Tensor:
    _, dtype, hwc, _ = meta
    g = grad_nchw.permute(0, 2, 3, 1) if hwc else grad_nchw
    return g.to(dtype).contiguous()


def unnormalise_grad(grad: torch.Tensor, std, compute: torch.dtype) -> torch.Tensor:
    """d/dx of (x - mean) / std is 1 / std per channel (uint8 inputs carry no gradient, so no 1/255)."""
    g = grad.to(compute)
    if std is not None:
        g = g / torch.tensor(std, dtype=compute, device=g.device).view(1, 3, 1, 1)
    return g
