"""The checkpoint format's rules: reading a file safely, the fields a GFNet checkpoint must hold and what
they may hold, and what the stored fields say (stage, cascade heads, policy input) (see :mod:`gfnet.checkpoint`)."""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional

import torch

__all__ = ["CheckpointError", "load_failure", "torch_load"]

_REQUIRED = ("model_prime_state_dict", "model_state_dict", "fc", "policy")


class CheckpointError(ValueError):
    """A file that is not a GFNet checkpoint, or whose weights do not fit its backbone."""


def load_failure(e: BaseException) -> str:
    """``Type: first sentence`` of why torch.load failed (its messages run over many lines)."""
    first = (str(e).splitlines() or [""])[0].split(". ")[0][:160]
    return f"{type(e).__name__}: {first}"


def torch_load(path: str, map_location="cpu", mmap: bool = False, what: str = "a gfnet or reference GFNet checkpoint"):
    """torch.load with weights_only=True (no code runs from the file), failures as one CheckpointError line.
    ``mmap``: tensors are paged in only when touched (cheap reads of a large file's small fields); files
    that cannot be mapped are read normally."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if mmap:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        except Exception:  # e.g. the legacy (non-zip) format: read it the ordinary way below
            pass
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle errors, truncated zips, text files, ...
        raise CheckpointError(f"{path} is not {what} (torch.load failed: {load_failure(e)})") from None


def _check_dict(path: str, obj) -> dict:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a gfnet or reference GFNet checkpoint: it holds a "
                              f"{type(obj).__name__}, not a dict")
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        hint = " (it looks like a plain state dict: a backbone's weights?)" if all(
            isinstance(k, str) and "." in k for k in list(obj)[:5]) else ""
        raise CheckpointError(f"{path} is not a gfnet or reference GFNet checkpoint: missing fields {missing}{hint}")
    for field in ("model_prime_state_dict", "model_state_dict", "fc"):
        if not isinstance(obj[field], Mapping) or not obj[field]:
            raise CheckpointError(f"{path}: '{field}' is {type(obj[field]).__name__}, not a state dict")
    if obj["policy"] is not None and not isinstance(obj["policy"], Mapping):
        raise CheckpointError(f"{path}: 'policy' is {type(obj['policy']).__name__}, not a state dict or None")
    return obj


def _check_stored_fields(path: str, obj: dict) -> None:
    """The fields that describe the model hold what they should: a backbone name, whole numbers, a class list
    (a hand-edited or foreign file otherwise fails later with a traceback that names nothing)."""
    name = obj.get("model_name")
    if name is not None and not isinstance(name, str):
        raise CheckpointError(f"{path}: its 'model_name' is {type(name).__name__} {name!r}, not a backbone name; "
                              "fix the file, or remove the field and pass --arch")
    for field in ("patch_size", "T", "num_classes"):
        value = obj.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise CheckpointError(f"{path}: its {field!r} is {type(value).__name__} {value!r}, not a whole number "
                                  ">= 1; fix the file, or remove the field and pass it as an option")
    flops = obj.get("flops")
    numbers = isinstance(flops, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) or isinstance(v, torch.Tensor) and v.numel() == 1
        for v in flops)
    if flops is not None and not (numbers or isinstance(flops, torch.Tensor) and flops.dim() == 1):
        raise CheckpointError(f"{path}: its 'flops' is {type(flops).__name__}, not a list of Multiply-Add counts "
                              "(one per step)")
    classes = obj.get("classes")
    if classes is not None and not (isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes)):
        raise CheckpointError(f"{path}: its 'classes' is {type(classes).__name__}, not a list of class folder names")
    size, crop = obj.get("image_size"), obj.get("crop_pct")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise CheckpointError(f"{path}: its 'image_size' is {type(size).__name__} {size!r}, not a whole number >= 1")
    if crop is not None and (isinstance(crop, bool) or not isinstance(crop, (int, float)) or not 0 < crop <= 1):
        raise CheckpointError(f"{path}: its 'crop_pct' is {type(crop).__name__} {crop!r}, not a number in (0, 1]")


def _stored_stage(obj: dict) -> Optional[int]:
    state = obj.get("train_state")
    if isinstance(state, Mapping) and state.get("stage") in (1, 2, 3):
        return int(state["stage"])
    if "optimizer" not in obj:
        return None
    # The reference's train.py: stage 2 has no SGD (optimizer None) but PPO's Adam; stage 1 has SGD and
    # no PPO (policy and ppo_optimizer None); stage 3 has both (its Adam never steps).
    has_sgd, has_ppo = obj.get("optimizer") is not None, obj.get("ppo_optimizer") is not None
    if has_ppo and not has_sgd:
        return 2
    if has_sgd and not has_ppo and obj.get("policy") is None:
        return 1
    if has_sgd and has_ppo:
        return 3
    return None


def _cascade_heads(fc: Mapping[str, Any]) -> list:
    return sorted(int(m.group(1)) for k in fc for m in [re.match(r"^fc_(\d+)\.weight$", k)] if m)


def _cascade_fits(heads, T: int) -> bool:
    """A cascade holds fc_2..fc_max(T, 5): up to fc_5 it fits any T <= 5, beyond only T = its last head."""
    return T <= 5 if heads[-1] <= 5 else T == heads[-1]


def _policy_blocks(config, policy: Mapping[str, Any]) -> Optional[int]:
    """ceil(P/32)^2 as the stored policy's input layer says (None when it cannot tell)."""
    key = "state_encoder.3.weight" if config.policy_conv else "state_encoder.0.weight"
    weight = policy.get(key)
    if weight is None or getattr(weight, "dim", lambda: 0)() != 2:
        return None
    per_block = 32 if config.policy_conv else config.feature_map_channels
    return int(weight.shape[1]) // per_block


def _resolve(path: str, name: str, flag: str, stored, asked, why_missing: str, require: bool):
    if stored is not None and asked is not None and stored != asked:
        raise CheckpointError(f"{path} holds a GFNet with {name} {stored!r}, but {flag} {asked!r} was "
                              f"asked for: drop {flag} or give {stored!r}")
    value = stored if stored is not None else asked
    if value is None and require:
        raise CheckpointError(f"{path} does not say its {name} ({why_missing}): pass {flag} "
                              f"(Python: {flag.lstrip('-').replace('-', '_')}=)")
    return value
