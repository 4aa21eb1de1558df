"""Cheap checks that an image file is whole, so that a decoder never meets a broken one.

DALI aborts the whole pipeline on a file it cannot decode, and ImageNet holds empty, truncated and
mislabelled files. Every file is therefore checked once, when the split is indexed:

- size 0: invalid ("empty file");
- JPEG (starts with the SOI marker FF D8 FF): valid when an EOI marker (FF D9) lies in its last
  bytes; otherwise (its end is missing, or junk follows the EOI) it is decoded in full with PIL
  to decide;
- PNG (the 8-byte signature): valid when its last chunk is IEND; otherwise decoded in full with PIL;
- anything else: decoded in full with PIL; valid only if PIL decodes it and its format is one that
  DALI decodes too (BMP, TIFF, WebP, PNM, JPEG 2000), so both backends read the same files.

Only suspicious files pay for a decode, so checking a 1.28M-file tree costs two small reads a file.
"""
from __future__ import annotations

import os

JPEG_SOI = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IEND = b"IEND\xaeB`\x82"

#: How many trailing bytes may follow a JPEG's EOI (some cameras pad files) before we decode to decide.
_TAIL_BYTES = 64

#: PIL format names of the files that both PIL and DALI's decoders read.
DECODABLE_FORMATS = frozenset({"JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000", "MPO"})


def check_image_file(path: str) -> tuple[str | None, int]:
    """Check that `path` holds a whole image that both backends decode.

    Returns:
        (reason, size): reason is None for a valid file, else a short phrase saying what is wrong
        ("empty file", "truncated or corrupt JPEG: ...", "not an image: ..."); size in bytes.
    """
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file", 0
        with open(path, "rb") as fh:
            head = fh.read(16)
            fh.seek(max(0, size - _TAIL_BYTES))
            tail = fh.read(_TAIL_BYTES)
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}", 0
    if head.startswith(JPEG_SOI):
        if JPEG_EOI in tail:
            return None, size
        return _decode_probe(path, "truncated or corrupt JPEG"), size
    if head.startswith(PNG_SIGNATURE):
        if tail.endswith(PNG_IEND):
            return None, size
        return _decode_probe(path, "truncated or corrupt PNG"), size
    return _decode_probe(path, "not an image"), size


def _decode_probe(path: str, what: str) -> str | None:
    """Decode `path` fully with PIL; None if it decodes to an image DALI reads too, else a reason."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            fmt = img.format
            img.load()
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...) on bad data
        return f"{what}: {describe_decode_error(exc, path)}"
    if fmt not in DECODABLE_FORMATS:
        return f"unsupported image format {fmt} (DALI decodes {', '.join(sorted(DECODABLE_FORMATS))})"
    return None


def describe_decode_error(exc: Exception, path: str) -> str:
    """A decoder's error message without the file's path (the report names the path once, first)."""
    return str(exc).replace(repr(path), "").replace(path, "").strip() or type(exc).__name__
