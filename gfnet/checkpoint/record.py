"""Reading every checkpoint layout into one typed record, :class:`CheckpointFile` (see :mod:`gfnet.checkpoint`).

A file is read once (:func:`read_record`); what it describes (backbone, patch size, T, classifier, classes,
geometry, stage, trained policy, run) is resolved from its fields, and every later question is asked of the
record: :meth:`CheckpointFile.resolve` adds the caller's values, :meth:`CheckpointFile.differences` names
every mismatch with a run at once, :meth:`CheckpointFile.run_info` says what run it belongs to,
:meth:`CheckpointFile.model_meta` gives the network's :class:`~gfnet.models.meta.ModelMeta`.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from gfnet.checkpoint.fields import (
    CheckpointError,
    _cascade_fits,
    _cascade_heads,
    _check_dict,
    _check_stored_fields,
    _policy_blocks,
    _resolve,
    _stored_stage,
    torch_load,
)
from gfnet.checkpoint.keys import strip_module_prefix
from gfnet.checkpoint.run import RunInfo, run_info
from gfnet.models.meta import ModelMeta

__all__ = ["CheckpointFile", "read_checkpoint", "read_record", "read_run_info"]

_WEIGHT_FIELDS = ("model_prime_state_dict", "model_state_dict", "fc", "policy")
# Training state: read by the run state (gfnet.train.run_state) from CheckpointFile.raw, kept out of net.meta.
_TRAINING_FIELDS = ("optimizer", "ppo_optimizer", "train_state")
# What the network itself holds (its config, sizes and classifier): not repeated in net.meta.
_DESCRIBED_FIELDS = ("model_name", "patch_size", "T", "num_classes", "classifier", "image_size", "crop_pct")


@dataclass
class CheckpointFile:
    """A checkpoint as read and resolved by :func:`read_record` / :func:`read_checkpoint`: the one record
    that the session, the trainer's run state, the run folder, gfnet-eval and gfnet-viz are handed.

    Attributes:
        path: the file. raw: the dict as stored (weights included, on ``map_location``).
        origin: "gfnet" (written by gfnet, either layout), "reference-release" (the reference's
            released inference files) or "reference-train" (the reference train.py's files).
        layout: "release" or "reference-train" (the backbone key layout: prefixed or not).
        prefixed: the backbone keys carry ``module.``.
        arch, patch_size, T: from the file, and after :meth:`resolve` from the caller (None while unknown);
            config: :class:`gfnet.config.BackboneConfig` of ``arch`` with the file's classifier and geometry
            (None until :meth:`resolve` while the record is :func:`read_record`'s).
        num_classes: from the classifier's output layer. classifier: "gru" or "cascade".
        stage: the training stage that wrote the file, where the file tells (gfnet's train_state, or
            the reference's optimizer/ppo_optimizer/policy pattern), else None.
        trained_policy: the file holds a policy that stage 2 trained (False: policy None, or a
            stage-1 file whose policy is the untrained initialisation).
        classes: the class folder names the file's labels index (None: it names none).
        image_size, crop_pct: the evaluation geometry the file states (None: the backbone's).
        heads: the cascade classifier's heads (fc_2.. numbers; empty for a GRU).
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
    classes: Optional[list] = None
    image_size: Optional[int] = None
    crop_pct: Optional[float] = None
    heads: tuple = ()

    @property
    def train_state(self) -> Optional[dict]:
        """gfnet's training state (``train_state``), None in other files."""
        state = self.raw.get("train_state")
        return state if isinstance(state, dict) else None

    def resolve(self, arch: Optional[str] = None, patch_size: Optional[int] = None, T: Optional[int] = None,
                require: bool = True) -> CheckpointFile:
        """This record with the caller's ``arch``, ``patch_size`` and ``T`` (``--arch``, ...) where the file
        stores none; a value given by both must agree (see :func:`read_checkpoint`). No file is read."""
        return _describe(self.path, self.raw, arch, patch_size, T, require)

    def run_info(self) -> RunInfo:
        """The :class:`RunInfo` of this training checkpoint; CheckpointError when it holds no training state."""
        return run_info(self.path, self.raw)

    def model_meta(self) -> ModelMeta:
        """The network's :class:`~gfnet.models.meta.ModelMeta` from this file (tensors copied out of the file)."""
        named = {f.name for f in dataclasses.fields(ModelMeta)} - {"extras", "trained_policy", "source_origin",
                                                                    "stage"}
        skip = set(named) | set(_WEIGHT_FIELDS + _TRAINING_FIELDS + _DESCRIBED_FIELDS) | {"trained_policy"}
        values = {k: _own(self.raw[k]) for k in named if k in self.raw}
        extras = {k: _own(v) for k, v in self.raw.items() if k not in skip}
        return ModelMeta(**values, trained_policy=self.trained_policy, source_origin=self.origin,
                         stage=self.stage, extras=extras)

    def differences(self, arch: Optional[str] = None, patch_size: Optional[int] = None, T: Optional[int] = None,
                    classifier: Optional[str] = None, num_classes: Optional[int] = None,
                    options: Optional[Mapping[str, Any]] = None) -> list:
        """Every way in which this file's model differs from the one described (None: not compared), one
        ``"<what> <file's> (checkpoint) vs <given> (this run)"`` string each. ``options``: option values of a
        run, compared with those its ``train_state`` stored (where it stored them)."""
        pairs = [("architecture", self.arch, arch), ("patch size", self.patch_size, patch_size),
                 ("T", self.T, T), ("classifier", self.classifier, classifier),
                 ("classes", self.num_classes, num_classes)]
        stored = (self.train_state or {}).get("options") or {}
        pairs += [(name, stored[name], value) for name, value in (options or {}).items() if name in stored]
        out = [f"{name} {have} (checkpoint) vs {want} (this run)" for name, have, want in pairs
               if None not in (have, want) and have != want]
        if self.T is None and T is not None and self.classifier == "cascade" and not _cascade_fits(self.heads, T):
            out.append(f"T: the cascade fc_{self.heads[0]}..fc_{self.heads[-1]} (checkpoint) vs {T} (this run)")
        return out


def _own(value):
    """``value`` with its tensors copied out of a memory-mapped file (so that holding it keeps no file open)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, list):
        return [_own(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_own(v) for v in value)
    return value


def _describe(path: str, obj: dict, arch, patch_size, T, require: bool, configure: bool = True) -> CheckpointFile:
    """The record of the checked dict ``obj`` read from ``path``, with the caller's values (see read_checkpoint).
    ``configure``: derive the backbone's config (for a timm backbone outside the reference's table that builds
    the model once, which draws from the random generators) and check the policy against the patch size."""
    from gfnet.config import get_config

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
    if T is not None and classifier == "cascade" and not _cascade_fits(heads, T):
        raise CheckpointError(f"{path}: its cascade classifier has heads fc_{heads[0]}..fc_{heads[-1]}, "
                              f"which does not fit T={T}")
    geometry = {k: obj[k] for k in ("image_size", "crop_pct") if obj.get(k) is not None}
    config = None
    if arch is not None and configure:
        try:
            config = get_config(arch, classifier)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from e
        # the evaluation geometry the network was trained for, where the file states it (gfnet's own files; a
        # reference file takes the backbone's): S and the centre-crop fraction of the loaders, the viz and the engine
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
    classes = obj.get("classes")
    return CheckpointFile(path=path, raw=obj, origin=origin, layout="release" if prefixed else "reference-train",
                          prefixed=prefixed, arch=arch, patch_size=patch_size, T=T, num_classes=num_classes,
                          classifier=classifier, stage=stage,
                          trained_policy=obj["policy"] is not None and stage != 1
                          and obj.get("trained_policy") is not False, config=config,
                          classes=None if classes is None else [str(c) for c in classes],
                          image_size=geometry.get("image_size"), crop_pct=geometry.get("crop_pct"), heads=tuple(heads))


def read_record(path, map_location="cpu", mmap: bool = False) -> CheckpointFile:
    """Read any GFNet checkpoint once into its record, with what the file itself says (no caller values and no
    config yet: :meth:`CheckpointFile.resolve` adds them). ``mmap``: tensors are paged in when touched (the run
    folder reads its files so; a weight is read only when loaded into a network).

    Raises:
        FileNotFoundError: no such file. CheckpointError: not a GFNet checkpoint, or a field is malformed.
    """
    path = os.fspath(path)
    obj = _check_dict(path, torch_load(path, map_location, mmap=mmap))
    _check_stored_fields(path, obj)
    return _describe(path, obj, None, None, None, require=False, configure=False)


def read_checkpoint(path, arch: Optional[str] = None, patch_size: Optional[int] = None,
                    T: Optional[int] = None, map_location="cpu", require: bool = True) -> CheckpointFile:
    """Read any GFNet checkpoint (see :mod:`gfnet.checkpoint`) and resolve what it describes.

    The backbone, patch size and T come from the file where it stores them (model_name, patch_size;
    T, or len(flops), or a cascade with heads beyond fc_5) and otherwise from the caller; a value
    given by both must agree.

    Args:
        path: the file, or a record already read (:func:`read_record`; nothing is read again).
            arch / patch_size / T: the caller's values (``--arch``, ``--patch-size``, ``--T``), or None.
            map_location: as torch.load's.
        require: raise when the backbone, patch size or T is known neither from the file nor from the
            caller (False: leave them None, e.g. to print what a file stores).
    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a GFNet checkpoint; a value of the caller contradicts the file; a needed
            value is unknown (the message names the flag to pass).
    """
    record = path if isinstance(path, CheckpointFile) else read_record(path, map_location)
    return record.resolve(arch, patch_size, T, require)


def read_run_info(path: str, obj: Optional[dict] = None) -> RunInfo:
    """The :class:`RunInfo` of training checkpoint ``path`` (or of its already loaded dict ``obj``; a
    :class:`CheckpointFile` is asked directly). Reading a file for it maps it (no weight is read).

    Raises:
        CheckpointError: the file is unreadable, not a checkpoint, or holds no training state.
    """
    if isinstance(path, CheckpointFile):
        return path.run_info()
    return run_info(os.fspath(path), torch_load(path, mmap=True) if obj is None else obj)
