"""Write a small ImageNet-layout sample tree of real JPEGs, with no download.

The photos come from the two sample images that ship inside scikit-learn (``china.jpg`` and
``flower.jpg``, 640x427): every sample image is a random crop of one of them, resized to an
ImageNet-like size (about 500x375, landscape or portrait) and saved as a JPEG at quality 90.
``source="digits"`` instead upscales scikit-learn's 8x8 handwritten digits (class = digit), a task
a small model can actually learn, for demos.

Optionally the tree gets the bad files that the real ImageNet holds, so tests can check how the
loaders treat them: a grayscale JPEG, a CMYK JPEG and a PNG named ``.JPEG`` (all valid: decoded as
RGB), an empty file, a truncated JPEG and a text file named ``.JPEG`` (all invalid: skipped), and an
empty class folder.

The root must be new, empty, or hold exactly an earlier sample (named by its manifest
``.gfnet-sample.json``; that sample is then replaced): class folders written beside a user's own
would shift every label silently.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

#: Kinds of sample files: valid images (decoded as RGB), and broken files that loaders must skip.
VALID_KINDS = ("photo", "digit", "grayscale", "cmyk", "png_as_jpeg")
INVALID_KINDS = ("empty", "truncated", "not_an_image")


@dataclass
class SampleFile:
    """One file written by :func:`make_sample_tree`: path relative to the root, class, kind."""

    relpath: str
    class_name: str
    kind: str

    @property
    def valid(self) -> bool:
        return self.kind in VALID_KINDS


@dataclass
class SampleTree:
    """What :func:`make_sample_tree` wrote: the class folders of each split and the files."""

    root: str
    classes: list[str]
    empty_classes: list[str]
    files: dict[str, list[SampleFile]] = field(default_factory=dict)

    def valid_files(self, split: str) -> list[SampleFile]:
        return [f for f in self.files[split] if f.valid]

    def invalid_files(self, split: str) -> list[SampleFile]:
        return [f for f in self.files[split] if not f.valid]


#: The file that lists what make_sample_tree wrote, relative to the root.
MANIFEST = ".gfnet-sample.json"


def _earlier_sample(root: str) -> dict | None:
    """What an earlier sample in `root` wrote ({"files": [...], "dirs": [...]}), None if `root` is new or empty.

    `root` may hold an earlier sample, or part of one, and nothing else.

    Raises:
        FileExistsError: `root` is a file, or holds anything but exactly an earlier sample.
    """
    if not os.path.lexists(root):
        return None
    if not os.path.isdir(root):
        raise FileExistsError(f"{root!r} exists and is not a folder; pass a new or empty folder for the sample")
    if not os.listdir(root):
        return None
    refuse = FileExistsError(
        f"{root!r} is not empty: a sample written into it would mix its class folders with what is there "
        f"(and shift the labels); pass a new or empty folder")
    try:
        with open(os.path.join(root, MANIFEST), encoding="utf-8") as fh:
            manifest = json.load(fh)
        listed_files, listed_dirs = set(manifest["files"]), set(manifest["dirs"])
    except (OSError, ValueError, KeyError, TypeError):
        raise refuse from None
    files, dirs = set(), set()
    for top, subdirs, names in os.walk(root):
        rel = os.path.relpath(top, root)
        dirs.update(os.path.normpath(os.path.join(rel, d)) for d in subdirs)
        files.update(os.path.normpath(os.path.join(rel, n)) for n in names)
    if not files - {MANIFEST} <= listed_files or not dirs <= listed_dirs:  # something not ours is there
        raise refuse
    return manifest


def _remove_sample(root: str, manifest: dict) -> None:
    for rel in manifest["files"]:
        if os.path.lexists(os.path.join(root, rel)):  # the user may have deleted some
            os.remove(os.path.join(root, rel))
    for rel in sorted(manifest["dirs"], key=lambda d: d.count(os.sep), reverse=True):  # deepest first
        if os.path.isdir(os.path.join(root, rel)):
            os.rmdir(os.path.join(root, rel))
    os.remove(os.path.join(root, MANIFEST))


def _write_manifest(root: str, tree: SampleTree) -> None:
    files = sorted(os.path.normpath(f.relpath) for split in tree.files.values() for f in split)
    dirs = {os.path.dirname(f) for f in files} | {os.path.join(split, c) for split in tree.files for c in tree.classes}
    dirs |= {os.path.dirname(d) for d in dirs}
    tmp = os.path.join(root, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"files": files, "dirs": sorted(d for d in dirs if d)}, fh, indent=0)
    os.replace(tmp, os.path.join(root, MANIFEST))


def _class_names(num_classes: int) -> list[str]:
    # WordNet-id-like folder names, as ImageNet uses; spaced so that an empty class can sit between.
    return [f"n{1000000 + 7 * i:08d}" for i in range(num_classes)]


def _photo_sources() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)


def _random_photo(rng: np.random.Generator, sources, size: tuple[int, int]) -> Image.Image:
    """A random crop (area 25-100 %, aspect 3:4 to 4:3) of a source photo, resized to about `size`."""
    src = sources[rng.integers(len(sources))]
    h, w = src.shape[:2]
    area = rng.uniform(0.25, 1.0) * h * w
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw = int(min(w, round(np.sqrt(area * aspect))))
    ch = int(min(h, round(np.sqrt(area / aspect))))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    crop = Image.fromarray(src[y0:y0 + ch, x0:x0 + cw])
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    tw, th = size
    jitter = rng.uniform(0.85, 1.15)
    tw, th = max(8, int(tw * jitter)), max(8, int(th * jitter))
    if rng.random() < 0.25:  # ImageNet has portrait images too
        tw, th = th, tw
    return crop.resize((tw, th), Image.Resampling.BICUBIC)


def _digit_image(digit_pixels: np.ndarray, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """An 8x8 digit (values 0..16) upscaled to `size`, drawn dark on a tinted background."""
    gray = (255 - digit_pixels.reshape(8, 8) * (255.0 / 16.0)).astype(np.uint8)
    tint = rng.uniform(0.7, 1.0, size=3)
    rgb = (gray[:, :, None] * tint[None, None, :]).astype(np.uint8)
    return Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR)


def _jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_sample_tree(
    root: str | os.PathLike,
    num_classes: int = 4,
    train_per_class: int = 8,
    val_per_class: int = 4,
    photo_size: tuple[int, int] = (500, 375),
    quality: int = 90,
    source: str = "photos",
    bad_files: bool = False,
    seed: int = 0,
) -> SampleTree:
    """Write ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG``.

    Args:
        root: folder to write into: new, empty, or holding exactly an earlier sample (which is
            replaced).
        num_classes: number of class folders with images (at most 10 for ``source="digits"``).
        train_per_class, val_per_class: images per class folder in each split.
        photo_size: (width, height) of a landscape image before a +-15 % jitter; a quarter of the
            photos are portrait (width and height swapped).
        quality: JPEG quality of the written images.
        source: ``"photos"`` (crops of scikit-learn's sample photos) or ``"digits"`` (scikit-learn's
            8x8 digits upscaled; class i holds digit i).
        bad_files: also write, in each split, a grayscale JPEG, a CMYK JPEG and a PNG named ``.JPEG``
            (valid), an empty file, a truncated JPEG and a text file named ``.JPEG`` (invalid), and
            an empty class folder that sorts between the first and second class.
        seed: seed of the crops; the same arguments write the same bytes.

    Returns:
        A :class:`SampleTree` listing every file written, its class and kind.

    Raises:
        FileExistsError: `root` holds anything else (the message says to pass a new or empty folder).
        ValueError: an argument is out of range.
    """
    if source not in ("photos", "digits"):
        raise ValueError(f"source must be 'photos' or 'digits', got {source!r}")
    if source == "digits" and num_classes > 10:
        raise ValueError(f"source='digits' has 10 classes; got num_classes={num_classes}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an integer from 1 to 100 (JPEG quality), got {quality!r}")
    root = os.fspath(root)
    earlier = _earlier_sample(root)
    if earlier is not None:
        _remove_sample(root, earlier)
    rng = np.random.default_rng(seed)
    classes = _class_names(num_classes)
    empty_classes = []
    if bad_files:
        # Sorts after classes[0] and before classes[1], so it shifts the later labels if counted.
        empty_classes = [f"n{1000000 + 3:08d}"]
    tree = SampleTree(root=root, classes=sorted(classes + empty_classes), empty_classes=empty_classes)

    if source == "photos":
        sources = _photo_sources()
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        by_class = {d: np.flatnonzero(digits.target == d) for d in range(10)}

    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        files: list[SampleFile] = []
        for c in empty_classes:
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
        for ci, cname in enumerate(classes):
            cdir = os.path.join(root, split, cname)
            os.makedirs(cdir, exist_ok=True)
            for k in range(per_class):
                if source == "photos":
                    img = _random_photo(rng, sources, photo_size)
                    kind = "photo"
                else:
                    pick = by_class[ci][rng.integers(len(by_class[ci]))]
                    img = _digit_image(digits.data[pick], rng, photo_size)
                    kind = "digit"
                name = f"{cname}_{split}_{k:05d}.JPEG"
                with open(os.path.join(cdir, name), "wb") as fh:
                    fh.write(_jpeg_bytes(img, quality))
                files.append(SampleFile(f"{split}/{cname}/{name}", cname, kind))
        if bad_files:
            files += _write_bad_files(root, split, classes[-1], rng, sources if source == "photos" else None,
                                      photo_size, quality)
        tree.files[split] = files
    _write_manifest(root, tree)
    return tree


def _write_bad_files(root, split, cname, rng, sources, photo_size, quality) -> list[SampleFile]:
    if sources is None:
        base = Image.fromarray(rng.integers(0, 256, size=(photo_size[1], photo_size[0], 3), dtype=np.uint8))
    else:
        base = _random_photo(rng, sources, photo_size)
    good = _jpeg_bytes(base, quality)
    png = io.BytesIO()
    (base if sources is None else _random_photo(rng, sources, photo_size)).save(png, format="PNG")
    contents = {
        "grayscale": _jpeg_bytes(base.convert("L"), quality),
        "cmyk": _jpeg_bytes(base.convert("CMYK"), quality),
        "png_as_jpeg": png.getvalue(),
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "not_an_image": b"<html><body>404 Not Found</body></html>\n",
    }
    out = []
    for kind, data in contents.items():
        name = f"{cname}_{split}_{kind}.JPEG"
        with open(os.path.join(root, split, cname, name), "wb") as fh:
            fh.write(data)
        out.append(SampleFile(f"{split}/{cname}/{name}", cname, kind))
    return out
