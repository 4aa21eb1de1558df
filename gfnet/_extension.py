"""Loading of gfnet's C++ extension ``gfnet._C``: the one place that imports it and explains a failure."""
from __future__ import annotations

import torch  # noqa: F401  (gfnet._C links against torch's libraries: load them first)

__all__ = ["extension", "ExtensionMissing"]

_cache: dict = {}


class ExtensionMissing(ImportError):
    """gfnet._C is missing, broken or out of date; the message says how to rebuild it."""


def extension(*needed: str):
    """The ``gfnet._C`` module, checked to have the attributes ``needed``.

    Raises ExtensionMissing with the rebuild command: a missing extension is an actionable error, never a
    silent slowdown.
    """
    if "module" not in _cache:
        try:
            from gfnet import _C
            _cache["module"] = _C
        except ImportError as err:
            _cache["module"] = ExtensionMissing(
                f"gfnet's C++ extension gfnet._C failed to import ({err}); build it with "
                "`pip install --no-build-isolation -e .` (needs a C++ compiler and torch installed first)")
    module = _cache["module"]
    if isinstance(module, ExtensionMissing):
        raise module
    missing = [name for name in needed if not hasattr(module, name)]
    if missing:
        raise ExtensionMissing(f"gfnet._C has no {', '.join(missing)}: the extension is out of date; rebuild it "
                               "with `pip install --no-build-isolation -e .`")
    return module
