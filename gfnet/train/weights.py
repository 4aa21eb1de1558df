"""Loading weights into a GFNet for training: backbone initialisations and training checkpoints."""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Mapping

import torch

from gfnet.checkpoint import pycls_to_timm
from gfnet.models.encoder import Encoder
from gfnet.models.gfnet import GFNet

__all__ = ["load_backbone_weights", "load_network_weights"]


def _strip_prefix(state: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in state.items())


def _unwrap(obj, path: str) -> Mapping[str, torch.Tensor]:
    # Common containers of a backbone state dict: {"state_dict": ...}, {"model": ...}.
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                return obj[key]
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise ValueError(f"{path} holds no backbone state dict (expected a dict of tensors, or one under "
                     f"'state_dict' / 'model'); got {type(obj).__name__}")


def load_backbone_weights(encoder: Encoder, path: str, strict_head: bool = False) -> dict:
    """Load a plain backbone checkpoint (torchvision/timm key names; ``module.`` prefix allowed; RegNet
    in pycls names mapped to timm's) into ``encoder``.

    The backbone's own head is skipped when its shape differs (an ImageNet head on a 10-class task)
    unless ``strict_head``. Returns {"missing": [...], "skipped_head": [...]}.

    Raises:
        FileNotFoundError: no file; ValueError: the file's weights do not fit this backbone.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no backbone weights at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated zips, text files, ...
        first = (str(e).splitlines() or [""])[0].split(". ")[0][:160]
        raise ValueError(f"{path} is not a backbone state dict nor a gfnet or reference GFNet checkpoint "
                         f"(torch.load failed: {type(e).__name__}: {first})") from None
    state = _strip_prefix(_unwrap(obj, path))
    if encoder.config.family == "regnet" and any(".f.a." in k or k.startswith("stem.conv") for k in state):
        state = pycls_to_timm(state)
    own = encoder.net.state_dict()
    head_prefix = encoder.config.head_attr + "."
    skipped = [k for k in state if k.startswith(head_prefix) and k in own and state[k].shape != own[k].shape]
    if skipped and strict_head:
        raise ValueError(f"{path}: head {skipped} has another number of classes than the model")
    state = OrderedDict((k, v) for k, v in state.items() if k not in skipped)
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
                  if k in own and state[k].shape != own[k].shape]
    missing = [k for k in own if k not in state and k not in skipped]
    body_missing = [k for k in missing if not k.startswith(head_prefix)]
    if unexpected or mismatched or body_missing:
        raise ValueError(
            f"{path} does not fit backbone {encoder.config.name!r}: unexpected keys {unexpected[:5]}, "
            f"shape mismatches {mismatched[:5]}, missing keys {body_missing[:5]}. Is it this architecture's "
            "checkpoint (torchvision/timm names)?")
    encoder.net.load_state_dict(state, strict=False)
    return {"missing": missing, "skipped_head": skipped}


def load_network_weights(net: GFNet, obj: Mapping) -> None:
    """Load the weights of a reference-format checkpoint dict (as read by torch.load) into ``net``."""
    for field, encoder in (("model_prime_state_dict", net.model_prime), ("model_state_dict", net.model)):
        state = _strip_prefix(obj[field])
        if net.config.family == "regnet":
            state = pycls_to_timm(state)
        encoder.net.load_state_dict(state, strict=True)
    net.fc.load_state_dict(_strip_prefix(obj["fc"]), strict=True)
    net.policy.load_state_dict(_strip_prefix(obj["policy"]), strict=True)
