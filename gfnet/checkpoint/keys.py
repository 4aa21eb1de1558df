"""Checkpoint key tables: RegNet's pycls <-> timm names, nn.DataParallel's ``module.`` prefix, and the
reference's parameter order (what its optimiser states index)."""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Mapping

__all__ = ["PYCLS_TIMM_KEYS", "pycls_to_timm", "reference_parameter_order", "strip_module_prefix", "timm_to_pycls"]

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

