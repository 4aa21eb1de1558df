"""Device resolution, the device guard, and the defaults users expect on a GPU: one module for all."""
from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch

__all__ = ["resolve_device", "device_guard", "configure_device"]


def resolve_device(device: Union[str, torch.device, None] = None) -> torch.device:
    """The torch.device to run on: the one asked for, checked to exist, else CUDA when present, else the CPU.

    Raises ValueError with what to do for an unknown device name, a CUDA device on a machine without one,
    or a CUDA index past the visible GPUs.
    """
    if device is None or device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r} ({err}); use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} asked for, but this machine has no usable CUDA GPU "
                             "(torch.cuda.is_available() is False); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {device} asked for, but only {count} CUDA device(s) are visible "
                             f"(CUDA_VISIBLE_DEVICES={__import__('os').environ.get('CUDA_VISIBLE_DEVICES')!r})")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type not in ("cpu", "mps", "xpu", "meta"):
        raise ValueError(f"unsupported device {device}; use 'cpu', 'cuda' or 'cuda:N'")
    return device


def device_guard(device_or_tensor: Union[torch.device, torch.Tensor, None]):
    """A context in which CUDA work (Triton launches, streams, graphs) goes to the given tensor's or device's
    GPU, whatever the current device is; a null context for other devices."""
    device = device_or_tensor.device if isinstance(device_or_tensor, torch.Tensor) else device_or_tensor
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.device(torch.device(device))
    return contextlib.nullcontext()


def configure_device(device: torch.device, fp32_matmul: Optional[str] = "high") -> None:
    """The defaults users of a GPU expect, applied by the commands (never on import): cuDNN picks the fastest
    convolution for each shape (benchmark mode), and float32 matmuls and convolutions may use TF32 tensor
    cores (``fp32_matmul="high"``; "highest" keeps full float32). No effect on the CPU."""
    if torch.device(device).type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    if fp32_matmul is not None:
        torch.set_float32_matmul_precision(fp32_matmul)
        torch.backends.cudnn.allow_tf32 = fp32_matmul != "highest"
