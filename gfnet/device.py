"""Device resolution, the device guard, host-to-GPU copies without a host wait, and the process-wide GPU
settings of the commands: one module for all."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Union

import torch

__all__ = ["resolve_device", "device_guard", "to_device_async", "gpu_settings"]


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


def to_device_async(tensor: torch.Tensor, device: Union[torch.device, str]) -> torch.Tensor:
    """``tensor`` on ``device`` without a host synchronisation: a host tensor bound for a GPU goes through
    page-locked memory (a copy from pageable memory waits for the device's queued work first, which stalls the
    host once per call), asynchronously; anything else is a plain ``.to``. The pinned block is returned to
    torch's pinned-memory cache only after the copy has run."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        if not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(device, non_blocking=True)
    return tensor.to(device)


# Where torch has the fp32_precision switches (2.9 and newer), they are the ones to use: once a caller has set
# them, reading the legacy allow_tf32 flags raises ("mix of the legacy and new APIs").
def _tf32_switches() -> list:
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        owners = (torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None),
                  getattr(torch.backends.cudnn, "rnn", None))
        return [(owner, "fp32_precision") for owner in owners if hasattr(owner, "fp32_precision")]
    return [(torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32")]


def _tf32_value(attribute: str, tf32: bool):
    if attribute == "fp32_precision":
        return "tf32" if tf32 else "ieee"
    return tf32


@contextlib.contextmanager
def gpu_settings(tf32: Optional[bool] = None, cudnn_benchmark: Optional[bool] = True) -> Iterator[None]:
    """The process-wide GPU settings of a command's run, set on entry and restored on exit.

    Only the commands use it (gfnet-train, gfnet-eval, gfnet-bench), around their work: library functions
    leave these process-wide switches to their caller.

    Args:
        tf32: float32 matrix products and convolutions on TF32 tensor cores (True; faster, about 10 mantissa
            bits), full float32 (False), or leave what the process has (None).
        cudnn_benchmark: cuDNN times the convolution algorithms for each new shape and keeps the fastest (True),
            does not (False), or leave it (None).
    The flags only affect CUDA work; setting them on a machine without a GPU changes nothing.
    """
    switches = _tf32_switches() if tf32 is not None else []
    previous = [getattr(owner, name) for owner, name in switches], torch.backends.cudnn.benchmark
    try:
        for owner, name in switches:
            setattr(owner, name, _tf32_value(name, bool(tf32)))
        if cudnn_benchmark is not None:
            torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
        yield
    finally:
        for (owner, name), value in zip(switches, previous[0]):
            setattr(owner, name, value)
        torch.backends.cudnn.benchmark = previous[1]
