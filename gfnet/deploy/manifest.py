"""The deployment package's manifest: what a runtime needs to run a GFNet, and the checksums of its files.

A package is a folder: ``manifest.json`` and the graph files it names (``glance``, ``focus``, the classifier
graphs; ``.onnx`` or ``.pte``). The manifest (format :data:`FORMAT`) holds

- the model: ``arch``, ``image_size`` (S), ``patch_size`` (P), ``T``, ``num_classes``, ``classes`` (names or
  None), ``classifier`` ("gru" or "cascade"), ``glance_mode`` (the in-graph resize's interpolation);
- the input contract: ``input`` = {``dtype`` ("uint8": raw pixels, normalised in the graphs; "float32":
  already normalised with ``mean``/``std``), ``shape`` [N, 3, S, S]}, ``mean``, ``std`` in [0, 1] units;
- the graphs: ``graphs`` = name -> {``file``, ``inputs``, ``outputs``}, and ``steps`` = the classifier graph of
  each focus step 1..T-1; ``max_batch`` (ExecuTorch plans memory for it; None: any batch);
- the budget: ``flops`` (cumulative Multiply-Adds of steps 1..k), ``dynamic_threshold`` ([39, T] or None),
  ``budgeted_batch_classification`` and ``anytime_classification`` (where the checkpoint had them);
- provenance: ``versions`` (of everything that wrote it), ``created``, ``source``;
- ``files``: every other file of the package -> its sha256.

This module imports neither torch nor any runtime: :func:`read_manifest` is what a torch-free loader runs.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Mapping, Optional

__all__ = ["FORMAT", "MANIFEST", "PackageError", "sha256_file", "read_manifest", "check_thresholds"]

FORMAT = "gfnet-deploy/1"
MANIFEST = "manifest.json"
#: The runtimes a package is written for: format -> graph file extension.
EXTENSIONS = {"onnx": ".onnx", "executorch": ".pte"}
_REQUIRED = ("format", "runtime", "arch", "image_size", "patch_size", "T", "num_classes", "input", "graphs",
             "steps", "flops", "files")


class PackageError(ValueError):
    """A deployment package that cannot be used as it is (unreadable manifest, a file missing or changed):
    the message is one line that names the package and what to do."""


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: str, verify: bool = True) -> dict:
    """Read and check a package's manifest; with ``verify``, check every listed file's sha256.

    Raises:
        PackageError: no such folder, no or an unreadable manifest, another format, a missing field, a listed
            file that is missing or whose checksum differs (one line each, naming the package).
    """
    folder = os.fspath(folder)
    where = f"deployment package {folder}"
    if not os.path.isdir(folder):
        raise PackageError(f"{where}: no such folder (write one with gfnet-export)")
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except FileNotFoundError:
        raise PackageError(f"{where}: it has no {MANIFEST}; it is not a gfnet-export package (or its export was "
                           "interrupted): export it again") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PackageError(f"{where}: cannot read its {MANIFEST} ({type(e).__name__}: {e}); export it again") \
            from None
    if not isinstance(manifest, Mapping):
        raise PackageError(f"{where}: its {MANIFEST} holds a {type(manifest).__name__}, not the manifest; export "
                           "it again")
    if manifest.get("format") != FORMAT:
        raise PackageError(f"{where}: its {MANIFEST} has format {manifest.get('format')!r}, this gfnet reads "
                           f"{FORMAT!r}; export it again with this version")
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise PackageError(f"{where}: its {MANIFEST} lacks {', '.join(missing)}; export it again")
    if manifest["runtime"] not in EXTENSIONS:
        raise PackageError(f"{where}: unknown runtime {manifest['runtime']!r} (known: {', '.join(EXTENSIONS)})")
    files = manifest["files"]
    named = {g["file"] for g in manifest["graphs"].values()}
    unlisted = sorted(named - set(files))
    if unlisted:
        raise PackageError(f"{where}: graph file(s) {', '.join(unlisted)} have no checksum in {MANIFEST}; export "
                           "it again")
    for name, digest in files.items():
        if os.path.basename(name) != name or name in ("", ".", "..", MANIFEST):
            raise PackageError(f"{where}: {MANIFEST} lists a file outside the package ({name!r}); export it again")
        file_path = os.path.join(folder, name)
        if not os.path.isfile(file_path):
            raise PackageError(f"{where}: {name} is missing; copy the whole folder, or export it again")
        if verify and sha256_file(file_path) != digest:
            raise PackageError(f"{where}: {name} does not match its checksum in {MANIFEST} (changed or damaged "
                               "since export); copy it again or export it again")
    return dict(manifest)


def check_thresholds(thresholds: Any, manifest: Mapping[str, Any]) -> list:
    """The T exit thresholds of a request: a sequence of T numbers, or an int budget index into the
    manifest's ``dynamic_threshold`` (0..points-1). Returns a list of T floats.

    Raises:
        ValueError: the wrong count, NaN, an index out of range or a package without stored thresholds.
    """
    T = int(manifest["T"])
    if isinstance(thresholds, bool):
        raise ValueError(f"thresholds must be {T} numbers or a budget index, got {thresholds!r}")
    if isinstance(thresholds, int) or (hasattr(thresholds, "ndim") and getattr(thresholds, "ndim", 1) == 0
                                       and "int" in str(getattr(thresholds, "dtype", ""))):
        index = int(thresholds)
        table: Optional[list] = manifest.get("dynamic_threshold")
        if not table:
            raise ValueError("this package stores no budget thresholds (its checkpoint had no dynamic_threshold): "
                             f"give {T} thresholds instead of a budget index")
        if not 0 <= index < len(table):
            raise ValueError(f"budget index {index} is outside 0..{len(table) - 1} (the package's "
                             f"{len(table)} stored budgets)")
        values = table[index]
    else:
        try:
            values = [float(v) for v in (thresholds.tolist() if hasattr(thresholds, "tolist") else thresholds)]
        except (TypeError, ValueError):
            raise ValueError(f"thresholds must be {T} numbers or a budget index, got {thresholds!r}") from None
    values = [float(v) for v in values]
    if len(values) != T:
        raise ValueError(f"need one threshold per step (T={T}), got {len(values)}")
    if any(math.isnan(v) for v in values):
        raise ValueError(f"thresholds must not be NaN (a NaN threshold would switch early exit off); got {values}")
    return values
