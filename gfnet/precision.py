"""Precision: the names gfnet accepts for a compute dtype, and the autocast context of each.

One table for every entry point (anytime and budgeted inference, training, benchmarks, the CLIs)."""
from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch

__all__ = ["AMP_DTYPES", "amp_dtype", "autocast", "default_amp"]

# name -> the autocast dtype (None: no autocast, fp32)
AMP_DTYPES = {"fp32": None, "float32": None, "none": None, None: None, torch.float32: None,
              "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, torch.bfloat16: torch.bfloat16,
              "fp16": torch.float16, "float16": torch.float16, torch.float16: torch.float16}


def amp_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    """The autocast dtype of ``dtype`` ("fp32"/None, "bf16", "fp16" or a torch dtype); None for fp32."""
    try:
        return AMP_DTYPES[dtype]
    except (KeyError, TypeError):
        raise ValueError(f"dtype must be one of None, 'fp32', 'bf16', 'fp16' (or torch.float32/bfloat16/float16); "
                         f"got {dtype!r}") from None


def autocast(device: Union[torch.device, str], dtype, cache_enabled: bool = True):
    """torch.autocast for ``dtype`` on ``device``'s type, or a null context for fp32."""
    amp = amp_dtype(dtype)
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=amp, cache_enabled=cache_enabled)


def default_amp(device: Union[torch.device, str]) -> str:
    """The mixed precision users expect on ``device`` when they ask for one without naming it: bf16 on GPUs
    that have it (Ampere and newer) and on CPUs, fp16 on older GPUs."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp16"
    return "bf16"
