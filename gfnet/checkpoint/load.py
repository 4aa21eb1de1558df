"""Loading a checkpoint's record into a network: :func:`load_weights` (the one state-dict loader) and
:func:`load_checkpoint` (a :class:`gfnet.GFNet` from any checkpoint)."""
from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

import torch

from gfnet.checkpoint.fields import CheckpointError
from gfnet.checkpoint.keys import pycls_to_timm, strip_module_prefix
from gfnet.checkpoint.record import CheckpointFile, read_checkpoint

__all__ = ["load_checkpoint", "load_weights"]

log = logging.getLogger("gfnet.checkpoint")

_ENCODER_FIELDS = (("model_prime_state_dict", "model_prime"), ("model_state_dict", "model"))


def _load_into(module: torch.nn.Module, state: Mapping[str, Any], path: str, field: str, hint: str) -> None:
    """load_state_dict(strict=True) with an error that names the file, the field and the first
    mismatching keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}" + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}"
                         + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""))
        if shape:
            parts.append(f"shape mismatches (file vs model) {shape[:5]}")
        raise CheckpointError(f"{path}: the weights in '{field}' do not fit {hint}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def load_weights(net, ckpt: CheckpointFile, policy: bool = True) -> None:
    """Load a checkpoint's weights into ``net`` (strictly; ``module.`` prefix and pycls names handled).

    The policy is loaded when ``policy`` and the file has one (``policy: None`` leaves ``net.policy``
    as it is).

    Raises:
        CheckpointError: the weights do not fit ``net`` (the message names the keys).
    """
    if net.arch == ckpt.raw.get("model_name"):
        hint = f"the backbone the file names ({net.arch}). Was this file saved from another model?"
    else:
        hint = f"backbone {net.arch!r} (given by --arch/arch=). Is it the backbone this file was trained with?"
    for field, name in _ENCODER_FIELDS:
        state = strip_module_prefix(ckpt.raw[field])
        if net.config.family == "regnet":
            state = pycls_to_timm(state)
        _load_into(getattr(net, name).net, state, ckpt.path, field, hint)
    _load_into(net.fc, strip_module_prefix(ckpt.raw["fc"]), ckpt.path, "fc", hint)
    if policy and ckpt.raw["policy"] is not None:
        _load_into(net.policy, strip_module_prefix(ckpt.raw["policy"]), ckpt.path, "policy",
                   f"{hint} (or --patch-size is not the one it was trained with)")


def load_checkpoint(path, map_location="cpu", arch: Optional[str] = None, patch_size: Optional[int] = None,
                    T: Optional[int] = None):
    """Load any GFNet checkpoint (release or reference-train layout, the reference's or ours) as a
    :class:`gfnet.GFNet` in eval mode.

    ``path`` is a file, or a :class:`~gfnet.checkpoint.CheckpointFile` already read (nothing is read again).
    Files that do not name their backbone, patch size or T (the reference train.py's) need them from
    ``arch``, ``patch_size`` and ``T``; given values must agree with the file's. A file with
    ``policy: None`` (stage 1 of the reference's train.py) leaves a freshly initialised policy and
    ``net.meta.trained_policy = False``. What the file stores besides weights, optimiser states and the
    model's own description is in ``net.meta`` (:class:`gfnet.models.meta.ModelMeta`).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a GFNet checkpoint; its weights do not fit its backbone (the message
            names the file and the first mismatching keys); a value is missing or contradicts the file.
    """
    from gfnet.models import GFNet

    ckpt = read_checkpoint(path, arch=arch, patch_size=patch_size, T=T, map_location=map_location)
    net = GFNet(ckpt.config, patch_size=ckpt.patch_size, T=ckpt.T, num_classes=ckpt.num_classes)
    load_weights(net, ckpt)
    if not ckpt.trained_policy:
        log.info("%s holds no trained policy (%s): the focus steps use an untrained one until stage 2",
                 ckpt.path, "policy None" if ckpt.raw["policy"] is None else "a stage-1 file")
    net.meta = ckpt.model_meta()
    return net.eval()
