"""Checkpoint I/O: every kind of GFNet checkpoint in, the reference's two layouts out.

Three kinds of file exist in the wild, all dicts loaded with torch.load, all with the reference's
field names model_prime_state_dict, model_state_dict (the backbones), fc (the classifier) and policy:

- **release layout** (the reference's released files, read by its ``inference.py``; gfnet's default):
  backbone keys with the ``module.`` prefix (saved from nn.DataParallel), plus model_name, patch_size,
  model_flops, policy_flops, fc_flops, flops (one entry per step count, so T = len(flops)),
  anytime_classification, dynamic_threshold (Tensor[39, T]) and budgeted_batch_classification.
- **reference-train layout** (what the reference's ``train.py`` writes and reads back for stages 2/3
  and ``--resume``): un-prefixed backbone keys (it loads them strictly into bare backbones), fc,
  policy (None after stage 1), optimizer, ppo_optimizer (the optimisers' state dicts), epoch, acc,
  best_acc; no model_name, patch_size or T: those come from the caller.
- **gfnet's** files: either layout, plus fields of our own that the reference ignores (T, num_classes,
  classifier, gfnet_version, layout, train_state).

:func:`read_checkpoint` is the one reader behind every entry point (:func:`load_checkpoint`,
``gfnet-train --checkpoint/--resume``, ``gfnet-eval``, ``gfnet-viz``): it accepts any of them, with or
without the prefix, resolves the backbone, patch size and T from the file and the caller, and names
any disagreement. :func:`load_weights` is the one state-dict loader. RegNet encoders use
facebookresearch/pycls key names in every layout; we build RegNet through timm and map the names
with one table (:data:`PYCLS_TIMM_KEYS`), each direction derived from it.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import stat
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

__all__ = ["CheckpointError", "CheckpointFile", "LAYOUTS", "PYCLS_TIMM_KEYS", "REFERENCE_FIELDS",
           "REFERENCE_TRAIN_FIELDS", "atomic_save", "checkpoint_dict", "load_checkpoint", "load_weights",
           "load_failure", "pycls_to_timm", "read_checkpoint", "reference_parameter_order", "remove_stale_temps",
           "replaceable_target", "save_checkpoint",
           "strip_module_prefix", "timm_to_pycls", "torch_load"]

log = logging.getLogger("gfnet.checkpoint")

#: The two layouts :func:`save_checkpoint` writes (see the module docstring).
LAYOUTS = ("release", "reference-train")
REFERENCE_FIELDS = ("model_name", "patch_size", "model_prime_state_dict", "model_state_dict", "fc",
                    "policy", "model_flops", "policy_flops", "fc_flops", "flops",
                    "anytime_classification", "dynamic_threshold", "budgeted_batch_classification")
#: What the reference's train.py saves each epoch (its save_checkpoint call).
REFERENCE_TRAIN_FIELDS = ("epoch", "model_state_dict", "model_prime_state_dict", "fc", "acc", "best_acc",
                          "optimizer", "ppo_optimizer", "policy")
_REQUIRED = ("model_prime_state_dict", "model_state_dict", "fc", "policy")
_META_FIELDS = ("model_flops", "policy_flops", "fc_flops", "flops", "anytime_classification",
                "dynamic_threshold", "budgeted_batch_classification")
_WEIGHT_FIELDS = ("model_prime_state_dict", "model_state_dict", "fc", "policy")
# Training state: read by the trainer from CheckpointFile.raw, kept out of net.meta.
_TRAINING_FIELDS = ("optimizer", "ppo_optimizer", "train_state")
_ENCODER_FIELDS = (("model_prime_state_dict", "model_prime"), ("model_state_dict", "model"))


class CheckpointError(ValueError):
    """A file that is not a GFNet checkpoint, or whose weights do not fit its backbone."""


# ----------------------------------------------------------------------------- key names
#: RegNet key names, pycls (the reference's checkpoints) <-> timm (our modules): one table, each row a
#: (pycls, timm) pair of key fragments after the block prefix ``s<i>.b<j>.``, except the classifier
#: head, which sits at the top level. pycls puts a block's projection shortcut (``proj``/``bn``)
#: before its transform ``f``; timm puts ``downsample`` after ``conv3``.
PYCLS_TIMM_KEYS = (
    ("proj.", "downsample.conv."),
    ("bn.", "downsample.bn."),
    ("f.a.", "conv1.conv."),
    ("f.a_bn.", "conv1.bn."),
    ("f.b.", "conv2.conv."),
    ("f.b_bn.", "conv2.bn."),
    ("f.c.", "conv3.conv."),
    ("f.c_bn.", "conv3.bn."),
    ("f.se.f_ex.0.", "se.fc1."),
    ("f.se.f_ex.2.", "se.fc2."),
)
_PYCLS_TIMM_HEAD = ("fc.", "head.fc.")
_BLOCK = r"^(s\d+\.b\d+)\."


def _rules(direction: int):
    """(regex, replacement) rules from the table: direction 0 maps pycls -> timm, 1 timm -> pycls."""
    rules = [(re.compile(_BLOCK + re.escape(pair[direction])), r"\1." + pair[1 - direction])
             for pair in PYCLS_TIMM_KEYS]
    rules.append((re.compile("^" + re.escape(_PYCLS_TIMM_HEAD[direction])), _PYCLS_TIMM_HEAD[1 - direction]))
    return rules


_TO_TIMM, _TO_PYCLS = _rules(0), _rules(1)


def _rename_key(key: str, rules) -> str:
    for pattern, repl in rules:
        new, n = pattern.subn(repl, key)
        if n:
            return new
    return key


def pycls_to_timm(state: Mapping[str, Any]) -> OrderedDict[str, Any]:
    """Rename a pycls RegNet state dict to timm's RegNet names (order kept)."""
    return OrderedDict((_rename_key(k, _TO_TIMM), v) for k, v in state.items())


def timm_to_pycls(state: Mapping[str, Any]) -> OrderedDict[str, Any]:
    """Rename a timm RegNet state dict to pycls's names (the reference checkpoints' ones; order kept)."""
    return OrderedDict((_rename_key(k, _TO_PYCLS), v) for k, v in state.items())


def strip_module_prefix(state: Mapping[str, Any]) -> OrderedDict[str, Any]:
    """Drop nn.DataParallel's ``module.`` prefix from the keys that carry it."""
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in state.items())


def reference_parameter_order(encoder) -> list:
    """The names of ``encoder.net``'s parameters (our key names) in the order that the reference's
    backbone module lists them, i.e. the order of its ``model.parameters()`` and thus of its
    optimiser's state. The same as ours except for RegNet: pycls registers a block's projection
    shortcut before its transform, timm after."""
    names = [n for n, _ in encoder.net.named_parameters()]
    if encoder.config.family != "regnet":
        return names
    block = re.compile(_BLOCK)
    first_seen: dict = {}
    for i, n in enumerate(names):
        m = block.match(n)
        first_seen.setdefault(m.group(1) if m else n, i)

    def rank(item):
        i, name = item
        m = block.match(name)
        if not m:
            return (first_seen[name], 0, i)
        shortcut = _rename_key(name, _TO_PYCLS)[len(m.group(0)):].startswith(("proj.", "bn."))
        return (first_seen[m.group(1)], 0 if shortcut else 1, i)

    return [name for _, name in sorted(enumerate(names), key=rank)]


# ----------------------------------------------------------------------------- reading
@dataclass
class CheckpointFile:
    """A checkpoint as read and resolved by :func:`read_checkpoint`.

    Attributes:
        path: the file. raw: the dict as stored (weights included, on ``map_location``).
        origin: "gfnet" (written by gfnet, either layout), "reference-release" (the reference's
            released inference files) or "reference-train" (the reference train.py's files).
        layout: "release" or "reference-train" (the backbone key layout: prefixed or not).
        prefixed: the backbone keys carry ``module.``.
        arch, patch_size, T: resolved from the file and the caller (None only with ``require=False``);
            config: :class:`gfnet.config.BackboneConfig` of ``arch`` with the file's classifier.
        num_classes: from the classifier's output layer. classifier: "gru" or "cascade".
        stage: the training stage that wrote the file, where the file tells (gfnet's train_state, or
            the reference's optimizer/ppo_optimizer/policy pattern), else None.
        trained_policy: the file holds a policy that stage 2 trained (False: policy None, or a
            stage-1 file whose policy is the untrained initialisation).
    """

    path: str
    raw: dict
    origin: str
    layout: str
    prefixed: bool
    arch: Optional[str]
    patch_size: Optional[int]
    T: Optional[int]
    num_classes: int
    classifier: str
    stage: Optional[int]
    trained_policy: bool
    config: Any = None  # the BackboneConfig of arch with this classifier (None while arch is unknown)


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


def _load_file(path: str, map_location) -> dict:
    obj = torch_load(path, map_location)
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


def read_checkpoint(path, arch: Optional[str] = None, patch_size: Optional[int] = None,
                    T: Optional[int] = None, map_location="cpu", require: bool = True) -> CheckpointFile:
    """Read any GFNet checkpoint (see the module docstring) and resolve what it describes.

    The backbone, patch size and T come from the file where it stores them (model_name, patch_size;
    T, or len(flops), or a cascade with heads beyond fc_5) and otherwise from the caller; a value
    given by both must agree.

    Args:
        path: the file. arch / patch_size / T: the caller's values (``--arch``, ``--patch-size``,
            ``--T``), or None. map_location: as torch.load's.
        require: raise when the backbone, patch size or T is known neither from the file nor from the
            caller (False: leave them None, e.g. to print what a file stores).
    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a GFNet checkpoint; a value of the caller contradicts the file; a needed
            value is unknown (the message names the flag to pass).
    """
    from gfnet.config import get_config

    path = os.fspath(path)
    obj = _load_file(path, map_location)
    _check_stored_fields(path, obj)
    prefixed = any(k.startswith("module.") for k in obj["model_state_dict"])
    if obj.get("gfnet_version") is not None:
        origin = "gfnet"
    elif obj.get("model_name") is not None:
        origin = "reference-release"
    else:
        origin = "reference-train"
    fc = strip_module_prefix(obj["fc"])
    heads = _cascade_heads(fc)
    classifier = "gru" if "rnn.weight_ih_l0" in fc else ("cascade" if heads else None)
    if classifier is None:
        raise CheckpointError(f"{path}: its 'fc' entry has neither a GRU classifier (rnn.*, fc.weight) nor a "
                              f"cascade (fc_2.weight, ...); keys: {list(fc)[:6]}")
    num_classes = int(fc["fc.weight" if classifier == "gru" else f"fc_{heads[0]}.weight"].shape[0])
    if obj.get("classes") is not None and len(obj["classes"]) != num_classes:
        raise CheckpointError(f"{path}: it names {len(obj['classes'])} classes, but its classifier has {num_classes} "
                              "outputs")
    why = "the reference's train.py does not store it" if origin == "reference-train" else "not stored"
    arch = _resolve(path, "backbone", "--arch", obj.get("model_name"), arch, why, require)
    stored_P = None if obj.get("patch_size") is None else int(obj["patch_size"])
    patch_size = _resolve(path, "patch size", "--patch-size", stored_P,
                          None if patch_size is None else int(patch_size), why, require)
    if obj.get("T") is not None:
        stored_T = int(obj["T"])
    elif obj.get("flops") is not None:
        stored_T = len(obj["flops"])
    elif classifier == "cascade" and heads[-1] > 5:
        stored_T = heads[-1]  # a cascade holds fc_2..fc_max(T, 5): more than fc_5 means T = the last head
    else:
        stored_T = None
    T = _resolve(path, "sequence length T", "--T", stored_T, None if T is None else int(T),
                 why + ("; its cascade fc_2..fc_5 fits any T <= 5" if classifier == "cascade" else ""), require)
    if T is not None and classifier == "cascade" and not (T <= 5 if heads[-1] <= 5 else T == heads[-1]):
        raise CheckpointError(f"{path}: its cascade classifier has heads fc_{heads[0]}..fc_{heads[-1]}, "
                              f"which does not fit T={T}")
    config = None
    if arch is not None:
        try:
            config = get_config(arch, classifier)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from e
        # the evaluation geometry the network was trained for, where the file states it (gfnet's own files; a
        # reference file takes the backbone's): S and the centre-crop fraction of the loaders, the viz and the engine
        geometry = {k: obj[k] for k in ("image_size", "crop_pct") if obj.get(k) is not None}
        if geometry:
            config = config.replace(**geometry)
        if patch_size is not None and obj["policy"] is not None:
            blocks = _policy_blocks(config, strip_module_prefix(obj["policy"]))
            side = -(-patch_size // 32)  # ceil(P / 32): the feature map's side
            if blocks is not None and blocks != side * side:
                raise CheckpointError(
                    f"{path}: its policy reads a feature map of {blocks} cells, a patch size of {patch_size} "
                    f"gives {side}x{side}: is --patch-size right?")
    stage = _stored_stage(obj)
    return CheckpointFile(path=path, raw=obj, origin=origin, layout="release" if prefixed else "reference-train",
                          prefixed=prefixed, arch=arch, patch_size=patch_size, T=T, num_classes=num_classes,
                          classifier=classifier, stage=stage,
                          trained_policy=obj["policy"] is not None and stage != 1
                          and obj.get("trained_policy") is not False, config=config)


# ----------------------------------------------------------------------------- loading
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

    Files that do not name their backbone, patch size or T (the reference train.py's) need them from
    ``arch``, ``patch_size`` and ``T``; given values must agree with the file's. A file with
    ``policy: None`` (stage 1 of the reference's train.py) leaves a freshly initialised policy and
    ``net.meta["trained_policy"] = False``. Everything the file stores besides weights and optimiser
    states is in ``net.meta`` under the reference's field names.

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
    net.meta = {k: v for k, v in ckpt.raw.items() if k not in _WEIGHT_FIELDS + _TRAINING_FIELDS}
    net.meta.update({"model_name": ckpt.arch, "patch_size": ckpt.patch_size, "T": ckpt.T,
                     "trained_policy": ckpt.trained_policy, "source_origin": ckpt.origin})
    return net.eval()


# ----------------------------------------------------------------------------- writing


#: Temporary files of :func:`atomic_save`: ``.<name>.<host>-<pid>.<random>.gfnet-tmp`` beside the target.
_TEMP_RE = re.compile(r"^\..*\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.[a-z0-9_]+\.gfnet-tmp$")
#: Earlier gfnet builds named their temporary files `.tmp-XXXXXXXX.pth` (no owner in the name: removed
#: once 10 minutes old).
_LEGACY_TEMP_RE = re.compile(r"^\.tmp-[a-z0-9_]{8}\.pth$")
#: Seconds a temporary file must have stood unmodified before a save that holds the run folder's lock removes it
#: whoever wrote it (another host, a pid this host reuses): a live save writes its file without pauses that long.
STALE_TEMP_SECONDS = 600


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _process_start_time(pid: int) -> Optional[float]:
    """When process ``pid`` of this host started (seconds since the epoch), where /proc tells (Linux), else None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces
        with open("/proc/stat", "rb") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith(b"btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _writer_gone(pid: int, mtime: float) -> bool:
    """The process of this host that named a temporary file ``pid`` can no longer be writing it: it is gone,
    or the pid now belongs to a process that started after the file was last written (the pid was reused)."""
    if not _process_alive(pid):
        return True
    started = _process_start_time(pid)
    return started is not None and started > mtime + 2.0  # slack: the boot time in /proc is whole seconds


def remove_stale_temps(folder: str, lock_held: bool = False) -> list:
    """Delete the temporary files that killed :func:`atomic_save` calls left in ``folder``; returns their paths.

    Only gfnet's own names (``.NAME.HOST-PID.XXXX.gfnet-tmp``) are touched:

    - a file of this host whose process is gone, or whose pid now belongs to a process that started after the
      file was last written (a reused pid), is removed at once;
    - with ``lock_held`` (the caller holds the run folder's lock, :mod:`gfnet.train.run_folder`, so no other
      gfnet run writes into this folder), any file untouched for :data:`STALE_TEMP_SECONDS` is removed, whatever
      host wrote it: the killed saves of another node of a multi-node job, which this host cannot ask about;
    - without the lock, the files of other hosts stay (their writer may be alive);
    - earlier gfnet builds' ``.tmp-*.pth`` files go once 10 minutes old.
    """
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    host = _host_tag()
    now = time.time()
    for name in names:
        m = _TEMP_RE.match(name)
        legacy = m is None and _LEGACY_TEMP_RE.match(name) is not None
        if m is None and not legacy:
            continue
        try:
            mtime = os.stat(os.path.join(folder, name)).st_mtime
        except OSError:
            continue
        old = now - mtime > STALE_TEMP_SECONDS
        if legacy:
            stale = old
        else:
            stale = (m.group("host") == host and _writer_gone(int(m.group("pid")), mtime)) or (lock_held and old)
        if stale:
            try:
                os.unlink(os.path.join(folder, name))
                removed.append(os.path.join(folder, name))
            except OSError:
                pass
    return removed


def replaceable_target(path: str) -> str:
    """The file that an atomic replace of ``path`` writes: ``path`` itself, or the target of the symbolic
    link(s) it is. Refuses anything else than a regular file or a path that does not exist yet: renaming a
    new file over a named pipe, a socket or a device file (``/dev/null``, ``/dev/full``) would delete it and
    leave a regular file in its place; over a folder it would fail half-way.

    Raises:
        ValueError: the path (or its link's target) exists and is not a regular file.
    """
    path = os.fspath(path)
    target = os.path.realpath(path)
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return target
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode)
                else "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        via = f" (through the link to {target})" if target != os.path.abspath(path) else ""
        raise ValueError(f"{path}{via} is {kind}, not a regular file: gfnet writes only regular files (or a "
                         "symbolic link to one), never over a pipe or a device; give another path")
    return target


class _ErrorKeepingWriter:
    # torch.save reports an exception of a write (a full disk's OSError, a Ctrl-C's KeyboardInterrupt that
    # arrives while its C++ writer calls back into Python) as a RuntimeError "unexpected pos ...", with the
    # cause only in the exception's context; keeping it lets atomic_save raise the cause itself.
    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except BaseException as e:
            self.error = e
            raise

    def flush(self):
        return self.f.flush()


def _interrupt_behind(error: BaseException) -> Optional[BaseException]:
    """The KeyboardInterrupt (or SystemExit) that a RuntimeError of torch.save hides: an interrupt that arrives
    while its zip writer calls back into Python leaves the writer half-way, and closing it then fails with
    "unexpected pos", the interrupt only in the exception's context."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            return error
        error = error.__context__
    return None


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file.

    A symbolic link is written through (the link stays, its target gets the new content); an existing
    file keeps its permission bits (a 0600 file stays 0600; a new file gets 0666 less the umask). Only a
    regular file is replaced (:func:`replaceable_target`). Stale temporary files of killed saves in that
    folder are removed first (:func:`remove_stale_temps`). An interrupt (Ctrl-C) while writing removes the
    temporary file and raises KeyboardInterrupt; the old file stays.

    Raises:
        OSError: the write failed; its message names ``path`` and the cause ("No space left on device").
        ValueError: ``path`` is a named pipe, a device file, a folder (or a link to one).
    """
    path = os.fspath(path)
    target = replaceable_target(path)
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    remove_stale_temps(folder)
    try:
        old = os.stat(target)
    except FileNotFoundError:
        old = None
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)[:100]}.{_host_tag()}-{os.getpid()}.",
                               suffix=".gfnet-tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _ErrorKeepingWriter(f)
            try:
                torch.save(obj, writer)
            except RuntimeError as e:
                cause = writer.error or _interrupt_behind(e)
                if cause is not None:
                    raise cause from None
                raise
            f.flush()
            os.fsync(f.fileno())
        if old is not None:
            os.chmod(tmp, stat.S_IMODE(old.st_mode))
            if hasattr(os, "chown") and (old.st_uid, old.st_gid) != (os.getuid(), os.getgid()):
                try:
                    os.chown(tmp, old.st_uid, old.st_gid)
                except OSError:  # only root may give a file away; keep ours
                    pass
        else:  # mkstemp creates the file private (0600); give it the usual permissions of a new file.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None and e.errno:
            raise OSError(e.errno, f"cannot write it: {e.strerror}", path) from None
        raise


def checkpoint_dict(net, layout: str = "release", **meta) -> dict:
    """The checkpoint dict of ``net`` in ``layout`` (see :func:`save_checkpoint`)."""
    from gfnet import __version__
    from gfnet.flops import compute_flops

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    prefix = "module." if layout == "release" else ""

    def encoder_state(encoder):
        state = OrderedDict((k, v.detach().cpu()) for k, v in encoder.net.state_dict().items())
        if net.config.family == "regnet":
            state = timm_to_pycls(state)
        return OrderedDict((prefix + k, v) for k, v in state.items())

    def plain(module):
        return OrderedDict((k, v.detach().cpu()) for k, v in module.state_dict().items())

    fields = {k: v for k, v in net.meta.items() if k in _META_FIELDS}
    fields.update(meta)
    if layout == "release" and fields.get("flops") is None:
        fields.update(compute_flops(net))
    # policy=None asks for the reference's "no trained policy yet" (its stage-1 files); the release layout
    # always carries the policy's weights, as inference.py loads them.
    no_policy = fields.pop("policy", ...) is None if "policy" in fields else net.meta.get("trained_policy") is False
    policy = None if layout == "reference-train" and no_policy else plain(net.policy)
    obj = {
        "model_prime_state_dict": encoder_state(net.model_prime),
        "model_state_dict": encoder_state(net.model),
        "fc": plain(net.fc),
        "policy": policy,
    }
    if layout == "release":
        obj = {"model_name": net.arch, "patch_size": net.patch_size, **obj}
        for k in _META_FIELDS:
            obj[k] = fields.pop(k, None)
    else:
        for k in ("epoch", "acc", "best_acc", "optimizer", "ppo_optimizer"):
            obj[k] = fields.pop(k, None)
        # Extras the reference's train.py never reads, so that gfnet needs no --arch/--patch-size/--T.
        obj.update({"model_name": net.arch, "patch_size": net.patch_size})
    # Our own fields (the reference's code ignores them): T, classes, classifier kind, version, layout, and the
    # class folder names that the labels index (training data's; absent where the net was never trained here).
    if net.meta.get("classes") is not None:
        obj["classes"] = [str(c) for c in net.meta["classes"]]
    obj.update({"T": net.T, "num_classes": net.num_classes, "image_size": int(net.config.image_size),
                "crop_pct": float(net.config.crop_pct),
                "classifier": "gru" if net.fc.is_rnn else "cascade", "gfnet_version": __version__,
                "layout": layout, "trained_policy": not no_policy})
    obj.update(fields)
    return obj


def save_checkpoint(net, path: str, layout: str = "release", **meta) -> None:
    """Save ``net`` atomically in one of the reference's two layouts.

    - ``layout="release"`` (default; what the reference's ``inference.py`` and ``gfnet-eval`` read):
      encoder state dicts with the ``module.`` prefix, model_name, patch_size and the flops fields
      (computed when neither ``meta`` nor ``net.meta`` holds them); ``anytime_classification``,
      ``dynamic_threshold`` and ``budgeted_batch_classification`` from ``meta`` or ``net.meta``
      (None when never evaluated).
    - ``layout="reference-train"`` (what the reference's ``train.py`` loads with ``--checkpoint_path``
      for stages 2/3 and with ``--resume``): un-prefixed encoder state dicts, fc, policy (None when
      ``policy=None`` is passed or ``net.meta["trained_policy"]`` is False), and epoch, acc, best_acc,
      optimizer, ppo_optimizer from ``meta`` (None when not given; the optimiser state dicts must be
      in train.py's parameter order, see :mod:`gfnet.train.weights`).

    RegNet encoders get pycls's names in both. Extra ``meta`` keys are stored too.
    """
    atomic_save(checkpoint_dict(net, layout=layout, **meta), path)
