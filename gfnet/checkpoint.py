"""Checkpoint I/O in the reference's ``.pth.tar`` format, both ways.

A reference checkpoint is a dict with: model_name, patch_size, model_prime_state_dict and
model_state_dict (saved from nn.DataParallel, so with a ``module.`` prefix), fc, policy, model_flops,
policy_flops, fc_flops, flops (one entry per step count, so T = len(flops)), anytime_classification,
dynamic_threshold (Tensor[39, T]) and budgeted_batch_classification ([flops list, acc list]).
RegNet encoders use facebookresearch/pycls key names there; we build RegNet through timm and map
the names both ways. We write the same fields (plus a few of our own that the reference ignores),
atomically, so that the reference's ``inference.py`` can read our files.
"""
from __future__ import annotations

import os
import re
import socket
import stat
import tempfile
import time
from collections import OrderedDict
from typing import Any, Mapping

import torch

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint", "pycls_to_timm", "timm_to_pycls",
           "atomic_save", "remove_stale_temps", "REFERENCE_FIELDS"]

REFERENCE_FIELDS = ("model_name", "patch_size", "model_prime_state_dict", "model_state_dict", "fc",
                    "policy", "model_flops", "policy_flops", "fc_flops", "flops",
                    "anytime_classification", "dynamic_threshold", "budgeted_batch_classification")
_REQUIRED = ("model_name", "patch_size", "model_prime_state_dict", "model_state_dict", "fc", "policy")
_META_FIELDS = ("model_flops", "policy_flops", "fc_flops", "flops", "anytime_classification",
                "dynamic_threshold", "budgeted_batch_classification")


class CheckpointError(ValueError):
    """A file that is not a GFNet checkpoint, or whose weights do not fit its backbone."""


# pycls (RegNet) <-> timm key names, per block: (pycls regex, timm replacement) and the inverse.
_PYCLS_TO_TIMM = [
    (r"^(s\d+\.b\d+)\.proj\.", r"\1.downsample.conv."),
    (r"^(s\d+\.b\d+)\.bn\.", r"\1.downsample.bn."),
    (r"^(s\d+\.b\d+)\.f\.a\.", r"\1.conv1.conv."),
    (r"^(s\d+\.b\d+)\.f\.a_bn\.", r"\1.conv1.bn."),
    (r"^(s\d+\.b\d+)\.f\.b\.", r"\1.conv2.conv."),
    (r"^(s\d+\.b\d+)\.f\.b_bn\.", r"\1.conv2.bn."),
    (r"^(s\d+\.b\d+)\.f\.c\.", r"\1.conv3.conv."),
    (r"^(s\d+\.b\d+)\.f\.c_bn\.", r"\1.conv3.bn."),
    (r"^(s\d+\.b\d+)\.f\.se\.f_ex\.0\.", r"\1.se.fc1."),
    (r"^(s\d+\.b\d+)\.f\.se\.f_ex\.2\.", r"\1.se.fc2."),
    (r"^fc\.", r"head.fc."),
]
_TIMM_TO_PYCLS = [
    (r"^(s\d+\.b\d+)\.downsample\.conv\.", r"\1.proj."),
    (r"^(s\d+\.b\d+)\.downsample\.bn\.", r"\1.bn."),
    (r"^(s\d+\.b\d+)\.conv1\.conv\.", r"\1.f.a."),
    (r"^(s\d+\.b\d+)\.conv1\.bn\.", r"\1.f.a_bn."),
    (r"^(s\d+\.b\d+)\.conv2\.conv\.", r"\1.f.b."),
    (r"^(s\d+\.b\d+)\.conv2\.bn\.", r"\1.f.b_bn."),
    (r"^(s\d+\.b\d+)\.conv3\.conv\.", r"\1.f.c."),
    (r"^(s\d+\.b\d+)\.conv3\.bn\.", r"\1.f.c_bn."),
    (r"^(s\d+\.b\d+)\.se\.fc1\.", r"\1.f.se.f_ex.0."),
    (r"^(s\d+\.b\d+)\.se\.fc2\.", r"\1.f.se.f_ex.2."),
    (r"^head\.fc\.", r"fc."),
]


def _rename(state: Mapping[str, Any], rules) -> "OrderedDict[str, Any]":
    out = OrderedDict()
    for key, value in state.items():
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, key)
            if n:
                key = new
                break
        out[key] = value
    return out


def pycls_to_timm(state: Mapping[str, Any]) -> "OrderedDict[str, Any]":
    """Rename a pycls RegNet state dict to timm's RegNet names."""
    return _rename(state, _PYCLS_TO_TIMM)


def timm_to_pycls(state: Mapping[str, Any]) -> "OrderedDict[str, Any]":
    """Rename a timm RegNet state dict to pycls's names (the reference checkpoints' ones)."""
    return _rename(state, _TIMM_TO_PYCLS)


def _strip_module(state: Mapping[str, Any]) -> "OrderedDict[str, Any]":
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in state.items())


def _load_into(module: torch.nn.Module, state: Mapping[str, Any], path: str, field: str) -> None:
    """load_state_dict with an error that names the file, the field and the first mismatching keys."""
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
        raise CheckpointError(
            f"{path}: the weights in '{field}' do not fit the backbone the file names: " + "; ".join(parts)
            + ". Is model_name/patch_size right, or was this file saved from another model?")
    module.load_state_dict(state, strict=True)


def _num_classes(fc_state: Mapping[str, Any], path: str) -> int:
    for key in ("fc.weight", "fc_2.weight"):
        if key in fc_state:
            return int(fc_state[key].shape[0])
    raise CheckpointError(f"{path}: its 'fc' entry has neither a GRU classifier (fc.weight) nor a cascade "
                          f"(fc_2.weight); keys: {list(fc_state)[:6]}")


def _read(path: str, map_location) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle errors, truncated zips, text files, ...
        raise CheckpointError(f"{path} is not a readable GFNet checkpoint (torch.load failed: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a GFNet checkpoint: it holds a {type(obj).__name__}, not a dict")
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        hint = " (it looks like a plain state dict: a backbone's weights?)" if all(
            isinstance(k, str) and "." in k for k in list(obj)[:5]) else ""
        raise CheckpointError(f"{path} is not a GFNet checkpoint: missing fields {missing}{hint}")
    return obj


def load_checkpoint(path: str, map_location="cpu"):
    """Load a GFNet checkpoint, the reference's or ours, as a :class:`gfnet.GFNet` in eval mode.

    Accepts state dicts with or without the ``module.`` prefix and pycls RegNet names. Everything the
    file stores besides weights is in ``net.meta`` under the reference's field names.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is not a GFNet checkpoint, or its weights do not fit its backbone
            (the message names the file and the first mismatching keys).
    """
    from gfnet.models import GFNet
    from gfnet.config import get_config

    path = os.fspath(path)
    obj = _read(path, map_location)
    arch = obj["model_name"]
    try:
        config = get_config(arch, obj.get("classifier"))
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    patch_size = int(obj["patch_size"])
    if obj.get("T") is not None:
        T = int(obj["T"])
    elif obj.get("flops") is not None:
        T = len(obj["flops"])
    else:
        raise CheckpointError(f"{path}: cannot tell the sequence length T (neither 'T' nor 'flops' is stored)")
    fc_state = obj["fc"]
    net = GFNet(config, patch_size=patch_size, T=T, num_classes=_num_classes(fc_state, path))
    for field, encoder in (("model_prime_state_dict", net.model_prime), ("model_state_dict", net.model)):
        state = _strip_module(obj[field])
        if config.family == "regnet":
            state = pycls_to_timm(state)
        _load_into(encoder.net, state, path, field)
    _load_into(net.fc, _strip_module(fc_state), path, "fc")
    _load_into(net.policy, _strip_module(obj["policy"]), path, "policy")
    net.meta = {k: v for k, v in obj.items()
                if k not in ("model_prime_state_dict", "model_state_dict", "fc", "policy")}
    net.meta.setdefault("T", T)
    return net.eval()


#: Temporary files of :func:`atomic_save`: ``.<name>.<host>-<pid>.<random>.gfnet-tmp`` beside the target.
_TEMP_RE = re.compile(r"^\..*\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.[a-z0-9_]+\.gfnet-tmp$")
#: Earlier gfnet builds named their temporary files `.tmp-XXXXXXXX.pth` (no owner in the name: removed
#: once 10 minutes old).
_LEGACY_TEMP_RE = re.compile(r"^\.tmp-[a-z0-9_]{8}\.pth$")


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


def remove_stale_temps(folder: str) -> list:
    """Delete the temporary files that killed :func:`atomic_save` calls left in ``folder``; returns their paths.

    Only gfnet's own names are touched, and only those of processes of this host that are gone (a file of
    a live writer, or of another host sharing the folder, stays), plus earlier gfnet builds' ``.tmp-*.pth``
    files once 10 minutes old.
    """
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    host = _host_tag()
    for name in names:
        m = _TEMP_RE.match(name)
        if m:
            stale = m.group("host") == host and not _process_alive(int(m.group("pid")))
        elif _LEGACY_TEMP_RE.match(name):
            try:
                stale = time.time() - os.stat(os.path.join(folder, name)).st_mtime > 600
            except OSError:
                stale = False
        else:
            continue
        if stale:
            try:
                os.unlink(os.path.join(folder, name))
                removed.append(os.path.join(folder, name))
            except OSError:
                pass
    return removed


class _ErrorKeepingWriter:
    # torch.save reports a failed write (a full disk) as "unexpected pos ..." with the OSError only in
    # the exception's context; keeping it lets atomic_save raise the cause itself.
    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        return self.f.flush()


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file.

    A symbolic link is written through (the link stays, its target gets the new content); an existing
    file keeps its permission bits (a 0600 file stays 0600; a new file gets 0666 less the umask). Stale
    temporary files of killed saves in that folder are removed first (:func:`remove_stale_temps`).

    Raises:
        OSError: the write failed; its message names ``path`` and the cause ("No space left on device").
    """
    path = os.fspath(path)
    target = os.path.realpath(path)
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
            except RuntimeError:
                if writer.error is not None:
                    raise writer.error from None
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


def checkpoint_dict(net, **meta) -> dict:
    """The reference-format dict of ``net`` (see :func:`save_checkpoint`)."""
    from gfnet.flops import compute_flops

    def encoder_state(encoder):
        state = OrderedDict((k, v.detach().cpu()) for k, v in encoder.net.state_dict().items())
        if net.config.family == "regnet":
            state = timm_to_pycls(state)
        return OrderedDict(("module." + k, v) for k, v in state.items())

    def plain(module):
        return OrderedDict((k, v.detach().cpu()) for k, v in module.state_dict().items())

    fields = {k: v for k, v in net.meta.items() if k in _META_FIELDS}
    fields.update({k: v for k, v in meta.items()})
    if fields.get("flops") is None:
        fields.update(compute_flops(net))
    obj = {
        "model_name": net.arch,
        "patch_size": net.patch_size,
        "model_prime_state_dict": encoder_state(net.model_prime),
        "model_state_dict": encoder_state(net.model),
        "fc": plain(net.fc),
        "policy": plain(net.policy),
    }
    for k in _META_FIELDS:
        obj[k] = fields.pop(k, None)
    # Our own fields (the reference's loader ignores them): T, classes, classifier kind, version.
    from gfnet import __version__

    obj.update({"T": net.T, "num_classes": net.num_classes,
                "classifier": "gru" if net.fc.is_rnn else "cascade", "gfnet_version": __version__})
    obj.update(fields)
    return obj


def save_checkpoint(net, path: str, **meta) -> None:
    """Save ``net`` in the reference's format, atomically.

    Encoder state dicts get the ``module.`` prefix (the reference loads them into nn.DataParallel) and
    RegNet's pycls names; the flops fields are computed when neither ``meta`` nor ``net.meta`` holds
    them; ``anytime_classification``, ``dynamic_threshold`` and ``budgeted_batch_classification`` are
    taken from ``meta`` or ``net.meta`` (None when never evaluated). Extra ``meta`` keys are stored too.
    """
    atomic_save(checkpoint_dict(net, **meta), path)
