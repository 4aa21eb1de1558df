"""Index an ImageNet-layout split (``root/<split>/<class>/<image>``) once, validate it, cache the result.

Labels follow torchvision's ImageFolder: a class's label is the position of its folder among the
split's sorted class folders, and files are ordered by class, then by name. A caller that knows the
model's classes (the training split's, stored in its checkpoint) passes them as ``classes``: labels
then index that list, whatever folders the split lacks, and a split that holds a class folder the
list does not name is refused by name (its images have no label the model knows). Only the images directly
inside a class folder are read (ImageFolder also walks subfolders; ImageNet has none). Unlike
ImageFolder, an empty class folder is allowed: it keeps its label (so that the labels of a partial
tree, e.g. a validation subset, still match a model trained on all classes) and is reported with a
warning.

The index (file names, sizes and validation results of every class folder) is cached as JSON in
``$GFNET_CACHE_DIR`` (default ``$XDG_CACHE_HOME/gfnet`` or ``~/.cache/gfnet``), one file per split
keyed by the split folder's real path. A class folder is listed and validated again only when its
modification time changed (adding, removing or renaming a file changes it), so a run on a 1.28M-file
tree costs one ``stat`` per class folder. A file rewritten in place keeps its folder's time: pass
``refresh=True`` to re-index after that.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from gfnet.data.validate import check_image_file

log = logging.getLogger(__name__)

#: File name endings read as images (those of torchvision's ImageFolder), compared case-insensitively:
#: gfnet's one list of image extensions (import it from gfnet.data).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_CACHE_VERSION = 1


@dataclass
class SplitIndex:
    """The valid images of one split, their labels, and the files skipped.

    Attributes:
        split_dir: the split folder (``root/<split>``).
        classes: the class names that ``labels`` index: the split's sorted class folders, or the list the
            caller gave (:func:`index_split`'s ``classes``).
        files: absolute paths of the valid images, sorted by class then file name.
        labels: class index of each file in ``files``.
        skipped: (path, reason) of every image-named file that is not a whole, decodable image.
        empty_classes: classes that hold no valid image in this split (their folder is empty, broken or
            missing; still counted in ``classes``).
    """

    split_dir: str
    classes: list[str]
    files: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}


def default_cache_dir() -> str:
    """``$GFNET_CACHE_DIR``, else ``$XDG_CACHE_HOME/gfnet``, else ``~/.cache/gfnet``."""
    if os.environ.get("GFNET_CACHE_DIR"):
        return os.environ["GFNET_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gfnet")


def cache_path(split_dir: str, cache_dir: str | None = None) -> str:
    """Where the index of `split_dir` is cached."""
    real = os.path.realpath(split_dir)
    key = hashlib.sha1(real.encode()).hexdigest()[:16]
    name = os.path.basename(real) or "split"
    return os.path.join(cache_dir or default_cache_dir(), f"index-{name}-{key}.json")


def list_classes(root: str | os.PathLike, split: str) -> list[str]:
    """The sorted class folder names of ``root/<split>`` (hidden folders left out), without reading any image.

    Raises:
        FileNotFoundError: the root or the split folder does not exist (the message names it).
        ValueError: the split holds no class folder.
    """
    root = os.path.abspath(os.fspath(root))  # the file list must not depend on the working directory
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"dataset root {root!r} does not exist or is not a folder; pass the folder that holds "
            f"train/<class>/*.JPEG and val/<class>/*.JPEG (ImageNet layout), or write a small sample "
            f"with `gfnet-data make-sample {root}`")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        present = sorted(e.name for e in os.scandir(root) if e.is_dir())
        raise FileNotFoundError(
            f"split folder {split_dir!r} does not exist; {root!r} holds {present or 'no folders'}. "
            f"The layout must be {root}/{split}/<class>/<image>")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"split folder {split_dir!r} holds no class folder; the layout must be "
                         f"{split_dir}/<class>/<image>")
    return classes


def class_list_difference(expected, found) -> str:
    """How class list ``found`` differs from ``expected`` (both lists of names), in words; "" when they are equal
    (same names in the same order)."""
    expected, found = [str(c) for c in expected], [str(c) for c in found]
    if expected == found:
        return ""
    extra = [c for c in found if c not in set(expected)]
    missing = [c for c in expected if c not in set(found)]

    def names(items):
        return ", ".join(repr(c) for c in items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else "")

    parts = []
    if extra:
        parts.append(f"{len(extra)} unknown class folder(s) {names(extra)}")
    if missing:
        parts.append(f"{len(missing)} class(es) missing: {names(missing)}")
    if not parts:
        parts.append("the same names in another order")
    return "; ".join(parts)


def index_split(root: str | os.PathLike, split: str, cache_dir: str | None = None,
                refresh: bool = False, use_cache: bool = True, workers: int | None = None,
                classes=None) -> SplitIndex:
    """List and validate ``root/<split>``, reusing the cached index of unchanged class folders.

    Args:
        root: dataset root holding ``train/`` and ``val/`` (ImageNet layout).
        split: split folder name, e.g. ``"train"`` or ``"val"``.
        cache_dir: where to keep the index (default :func:`default_cache_dir`).
        refresh: ignore the cache and validate every file again.
        use_cache: read and write the cache at all (False: validate every time, write nothing).
        workers: threads that validate files (default ``min(32, 4 * cpu_count)``; the checks read files).
        classes: the class names that labels index (e.g. the training split's, as the model's checkpoint stores
            them); None: the split's own sorted class folders. A class without a folder in the split keeps its
            label (listed in ``empty_classes``).

    Raises:
        FileNotFoundError: the root or the split folder does not exist (the message names it).
        ValueError: the split holds no class folder, a class folder that ``classes`` does not name, or no
            valid image.
    """
    root = os.path.abspath(os.fspath(root))  # the file list must not depend on the working directory
    split_dir = os.path.join(root, split)
    present = list_classes(root, split)
    if classes is None:
        classes = present
    else:
        classes = [str(c) for c in classes]
        unknown = sorted(set(present) - set(classes))
        if unknown:
            shown = ", ".join(repr(c) for c in unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8
                                                                  else "")
            raise ValueError(f"{split_dir} holds {len(unknown)} class folder(s) that the model does not know: {shown} "
                             f"(it classifies the {len(classes)} classes of its training split); their images "
                             "would get another class's label: remove or rename those folders, or train a model "
                             "on these classes")

    cpath = cache_path(split_dir, cache_dir)
    cached = {} if (refresh or not use_cache) else _read_cache(cpath, split_dir)
    entries_by_class: dict[str, list] = {}
    mtimes: dict[str, int] = {}
    to_check: list[tuple[str, str]] = []  # (class, file name)
    for cname in present:
        cdir = os.path.join(split_dir, cname)
        mtime = os.stat(cdir).st_mtime_ns
        mtimes[cname] = mtime
        hit = cached.get(cname)
        if hit is not None and hit["mtime_ns"] == mtime:
            entries_by_class[cname] = hit["entries"]
            continue
        names = sorted(n for n in os.listdir(cdir)
                       if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)
                       and os.path.isfile(os.path.join(cdir, n)))
        entries_by_class[cname] = None  # listed now, validated below
        to_check += [(cname, n) for n in names]

    stale = [c for c, entries in entries_by_class.items() if entries is None]
    for cname in stale:
        entries_by_class[cname] = []
    if to_check:
        nthreads = workers or min(32, 4 * (os.cpu_count() or 1))
        paths = [os.path.join(split_dir, c, n) for c, n in to_check]
        with ThreadPoolExecutor(max_workers=nthreads) as pool:
            results = list(pool.map(check_image_file, paths, chunksize=64))
        for (cname, name), (reason, size) in zip(to_check, results):
            entries_by_class[cname].append([name, size, reason])
    if use_cache and (stale or set(cached) != set(present)):
        _write_cache(cpath, split_dir, {c: {"mtime_ns": mtimes[c], "entries": entries_by_class[c]}
                                        for c in present})

    index = SplitIndex(split_dir=split_dir, classes=list(classes))
    for label, cname in enumerate(classes):
        n_valid = 0
        for name, _size, reason in entries_by_class.get(cname, ()):
            path = os.path.join(split_dir, cname, name)
            if reason is None:
                index.files.append(path)
                index.labels.append(label)
                n_valid += 1
            else:
                index.skipped.append((path, reason))
        if n_valid == 0:
            index.empty_classes.append(cname)
    if not index.files:
        raise ValueError(f"split folder {split_dir!r} holds no valid image in its {len(present)} class "
                         f"folders ({len(index.skipped)} files skipped as broken)")
    return index


def _read_cache(cpath: str, split_dir: str) -> dict:
    """The cached classes of `split_dir`, or {} when there is no usable cache.

    A cache that exists but cannot be used (unreadable, truncated or garbage JSON, another format
    version, entries of the wrong shape) is reported with one warning and then rebuilt by the
    caller: a bad cache must never keep the loader from working.
    """
    try:
        with open(cpath, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        return _bad_cache(cpath, f"unreadable: {exc}")
    if not isinstance(data, dict):
        return _bad_cache(cpath, f"it holds a JSON {type(data).__name__}, not an index")
    if data.get("version") != _CACHE_VERSION:
        return _bad_cache(cpath, f"format version {data.get('version')!r}; this gfnet writes {_CACHE_VERSION}")
    if data.get("split_dir") != os.path.realpath(split_dir):
        return _bad_cache(cpath, f"it indexes {data.get('split_dir')!r}, not {os.path.realpath(split_dir)!r}")
    classes = data.get("classes")
    if not isinstance(classes, dict) or not all(_valid_class_entry(v) for v in classes.values()):
        return _bad_cache(cpath, "its class entries are malformed")
    return classes


def _valid_class_entry(entry) -> bool:
    # {"mtime_ns": int, "entries": [[name, size, reason or None], ...]}
    if not isinstance(entry, dict) or type(entry.get("mtime_ns")) is not int:
        return False
    files = entry.get("entries")
    return isinstance(files, list) and all(
        isinstance(f, list) and len(f) == 3 and isinstance(f[0], str) and type(f[1]) is int
        and (f[2] is None or isinstance(f[2], str)) for f in files)


def _bad_cache(cpath: str, why: str) -> dict:
    log.warning("data index cache %s cannot be used (%s); indexing the split again and rewriting the cache",
                cpath, why)
    return {}


def _write_cache(cpath: str, split_dir: str, classes: dict) -> None:
    data = {"version": _CACHE_VERSION, "split_dir": os.path.realpath(split_dir), "classes": classes}
    tmp = f"{cpath}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        os.makedirs(os.path.dirname(cpath), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, separators=(",", ":"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, cpath)  # atomic: concurrent ranks, or a kill, never leave a half-written index
    except OSError as exc:
        log.info("could not write the data index cache %s (%s); the split is indexed again next run",
                 cpath, exc)
        try:
            os.remove(tmp)
        except OSError:
            pass
