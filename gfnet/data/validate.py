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

When a file is read for decoding, both backends first run :func:`inspect_encoded` on its bytes, so
that they skip the same files with the same reason where their decoders would disagree:

- a JPEG whose image data holds a marker that libjpeg cannot go on from (a stray SOI/SOF or an
  unknown marker, a malformed table or scan header): PIL raises on it ("broken data stream") while
  DALI's decoder keeps the rows decoded so far. Garbled bytes without such a marker are decoded
  identically by both (libjpeg-turbo's error recovery, measured bit-identical), so they pass;
- a PNG whose chunks do not add up or fail their CRC: libpng (DALI) rejects a bad CRC in the image
  data that PIL never checks, and PIL rejects one in a metadata chunk that libpng skips;
- an image over PIL's decompression-bomb limit (``2 * PIL.Image.MAX_IMAGE_PIXELS`` pixels): PIL
  refuses it, DALI would decode it;
- a 16- or 32-bit grayscale image (PIL modes ``I;16*``, ``I``, ``F``): the reference's
  ``convert("RGB")`` clips its values to 0..255 (nearly all white) while DALI rescales them; such an
  image is not what its author meant, so both skip it and say how to convert it.

EXIF orientation is ignored by both (PIL does not apply it and DALI's decoders are told not to), as
in the reference pipeline.
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass

import numpy as np

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


# ------------------------------------------------------------------------------------- read-time checks

#: PIL modes whose ``convert("RGB")`` clips values to 0..255 instead of rescaling them.
CLIPPED_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


@dataclass(frozen=True)
class EncodedImage:
    """What :func:`inspect_encoded` found: ``reason`` None for a file both backends decode alike."""

    reason: str | None
    width: int = 0
    height: int = 0


def inspect_encoded(data) -> EncodedImage:
    """Check the bytes of one image file before decoding; its size (as stored, no EXIF rotation).

    Args:
        data: the whole file, ``bytes`` or a 1-D uint8 array.

    Returns:
        An :class:`EncodedImage`; ``reason`` says why neither backend reads the file (see the module
        docstring), or is None.
    """
    from PIL import Image

    raw = data if isinstance(data, bytes) else memoryview(np.ascontiguousarray(data, dtype=np.uint8)).tobytes()
    if raw.startswith(JPEG_SOI):
        reason, width, height = jpeg_structure(raw)
        if reason is not None:
            return EncodedImage(reason)
    else:
        if raw.startswith(PNG_SIGNATURE):
            reason = png_structure(raw)
            if reason is not None:
                return EncodedImage(reason)
        try:
            with Image.open(io.BytesIO(raw)) as img:
                (width, height), mode = img.size, img.mode
        except Image.DecompressionBombError as exc:
            pixels = re.search(r"\((\d+) pixels\)", str(exc))
            return EncodedImage(_too_large(int(pixels.group(1))) if pixels else f"image too large: {exc}")
        except Exception as exc:  # PIL raises many types on bad data
            return EncodedImage(f"not an image PIL can read: {describe_decode_error(exc, '')}")
        if mode in CLIPPED_MODES:
            return EncodedImage(
                f"{'16' if mode.startswith('I;16') else '32'}-bit grayscale image (PIL mode {mode}): the reference "
                f"pipeline's convert('RGB') clips it to 0..255 (nearly all white); convert it to 8-bit "
                f"grayscale or RGB to use it")
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > 2 * limit:
        return EncodedImage(_too_large(width * height))
    return EncodedImage(None, width, height)


def _too_large(pixels: int) -> str:
    from PIL import Image

    return (f"image too large: {pixels} pixels, over PIL's decompression-bomb limit of "
            f"{2 * Image.MAX_IMAGE_PIXELS} (2 * PIL.Image.MAX_IMAGE_PIXELS); raise that limit if you trust the file")


def png_structure(raw: bytes) -> str | None:
    """Walk a PNG's chunks up to IEND, checking each one's length and CRC; None if they add up."""
    import zlib

    pos, n = len(PNG_SIGNATURE), len(raw)
    while pos + 12 <= n:
        length = int.from_bytes(raw[pos:pos + 4], "big")
        kind = raw[pos + 4:pos + 8]
        end = pos + 8 + length
        if end + 4 > n:
            return f"truncated or corrupt PNG: chunk {kind!r} at byte {pos} runs past the end of the file"
        if zlib.crc32(raw[pos + 4:end]) != int.from_bytes(raw[end:end + 4], "big"):
            return f"corrupt PNG: bad CRC in chunk {kind!r} at byte {pos}"
        if kind == b"IEND":
            return None
        pos = end + 4
    return "truncated PNG: no IEND chunk"


# Markers libjpeg reads after the first scan header: DHT, DAC, SOS, DQT, DNL, DRI, APPn, COM. Any
# other (a second SOI or SOF, a reserved code) stops libjpeg with a fatal error.
_AFTER_SOS = frozenset([0xC4, 0xCC, 0xDA, 0xDB, 0xDC, 0xDD, 0xFE, *range(0xE0, 0xF0)])
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])  # TEM, RST0-7: no length
_SOF = frozenset(set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC})


def jpeg_structure(raw: bytes) -> tuple[str | None, int, int]:
    """Walk a JPEG's markers as libjpeg reads them: (reason or None, width, height).

    The reason names the first thing that libjpeg treats as fatal: a marker it does not know, a
    second frame header, a segment whose length or table indices are impossible, or no end marker.
    Scan data is searched for markers with numpy (a 100 kB file takes about 30 us).
    """
    n = len(raw)
    pos, comps, width, height = 2, None, 0, 0
    while True:  # the header, up to and including the first scan header
        if pos >= n or raw[pos] != 0xFF:
            return f"corrupt JPEG: no marker at byte {pos} of its header", 0, 0
        while pos < n and raw[pos] == 0xFF:
            pos += 1
        if pos + 2 >= n:
            return "truncated JPEG: it ends inside its header", 0, 0
        m = raw[pos]
        pos += 1
        if m in _STANDALONE:
            continue
        if m not in _SOF and m not in _AFTER_SOS and not 0xF0 <= m <= 0xFD and m != 0xC8:
            return f"corrupt JPEG: marker 0xFF{m:02X} at byte {pos - 2} of its header", 0, 0
        length = (raw[pos] << 8) | raw[pos + 1]
        if length < 2 or pos + length > n:
            return f"corrupt JPEG: impossible segment length at byte {pos - 2}", 0, 0
        seg = raw[pos + 2:pos + length]
        if m in _SOF and comps is not None:
            return f"corrupt JPEG: a second frame header at byte {pos - 2}", 0, 0
        err = _segment_error(m, seg, comps)
        if err:
            return f"corrupt JPEG: {err} at byte {pos - 2}", 0, 0
        if m in _SOF:
            comps = {seg[6 + 3 * i] for i in range(seg[5])}
            height, width = (seg[1] << 8) | seg[2], (seg[3] << 8) | seg[4]
        pos += length
        if m == 0xDA:
            if comps is None:
                return "corrupt JPEG: image data before the frame header", 0, 0
            break
    buf = np.frombuffer(raw, dtype=np.uint8)
    ff = np.flatnonzero(buf[pos:n - 1] == 0xFF) + pos
    code = buf[ff + 1]
    # Inside scan data FF is followed by 00 (a stuffed FF byte), FF (fill) or RSTn; anything else is a marker.
    is_marker = (code != 0x00) & (code != 0xFF) & ((code < 0xD0) | (code > 0xD7))
    for k, m in zip(ff[is_marker].tolist(), code[is_marker].tolist()):
        if k < pos:
            continue  # inside a segment already stepped over
        if m == 0xD9:
            return None, width, height
        if m == 0x01:
            pos = k + 2
            continue
        if m not in _AFTER_SOS:
            return f"corrupt JPEG: marker 0xFF{m:02X} at byte {k}, inside its image data", 0, 0
        length = (raw[k + 2] << 8) | raw[k + 3] if k + 4 <= n else 0
        if length < 2 or k + 2 + length > n:
            return f"corrupt JPEG: impossible segment length at byte {k}", 0, 0
        err = _segment_error(m, raw[k + 4:k + 2 + length], comps)
        if err:
            return f"corrupt JPEG: {err} at byte {k}", 0, 0
        pos = k + 2 + length
    return "truncated JPEG: no end-of-image marker after its image data", 0, 0


def _segment_error(m: int, seg: bytes, comps) -> str | None:
    """libjpeg's fatal checks on the payload of one marker segment (the bytes after its length)."""
    n = len(seg)
    if m == 0xC4:  # DHT: (class/index, 16 code counts, symbols) per table
        k = 0
        while k < n:
            if k + 17 > n or (seg[k] & 0xEF) > 3:
                return "bad Huffman table"
            count = sum(seg[k + 1:k + 17])
            if count > 256 or k + 17 + count > n:
                return "bad Huffman table"
            k += 17 + count
    elif m == 0xDB:  # DQT: (precision/index, 64 or 128 bytes) per table
        k = 0
        while k < n:
            if (seg[k] & 15) > 3:
                return "bad quantisation table index"
            k += 1 + (128 if seg[k] >> 4 else 64)
            if k > n:
                return "bad quantisation table"
    elif m == 0xCC:  # DAC: (index, value) pairs
        if n % 2:
            return "bad arithmetic-coding table"
        for k in range(0, n, 2):
            idx, val = seg[k], seg[k + 1]
            if idx >= 32 or (idx >= 16 and not 1 <= val <= 63) or (idx < 16 and (val & 15) > (val >> 4)):
                return "bad arithmetic-coding table"
    elif m == 0xDD:  # DRI
        if n != 2:
            return "bad restart interval"
    elif m == 0xDA:  # SOS: component count, (id, tables) per component, 3 progression bytes
        ns = seg[0] if n else 0
        if not 1 <= ns <= 4 or n != 4 + 2 * ns:
            return "bad scan header"
        if comps is not None and any(seg[1 + 2 * i] not in comps for i in range(ns)):
            return "scan header names an unknown component"
    elif m in _SOF:  # precision, height, width, component count, 3 bytes per component
        if n < 6 or seg[5] < 1 or n != 6 + 3 * seg[5] or ((seg[3] << 8) | seg[4]) == 0:
            return "bad frame header"
    return None


def read_checked(path: str):
    """(the file's bytes, its :class:`EncodedImage`) or (None, why the file is skipped): the read and the
    check before decoding that both backends share, so that they skip the same files for the same reason."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:  # moved or unreadable since the split was indexed
        return None, f"cannot read: {exc.strerror or exc}"
    if not data:
        return None, "empty file (emptied since the split was indexed)"
    check = inspect_encoded(data)
    if check.reason is not None:
        return None, check.reason
    return data, check
