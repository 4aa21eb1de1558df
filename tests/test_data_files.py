"""Both data backends give the same image for every file, or both skip it with the same reason.

Each fault is a real file written here: a JPEG with an EXIF orientation tag, 16-bit PNGs, JPEGs and
PNGs corrupted in the middle of their image data, a PNG over PIL's decompression-bomb limit. Evaluation
runs with image_size = crop_pct * shorter side, so the resize is an identity and the crop an integer
slice: what is compared is the decoders' output.

Tolerance (uint8 levels): 0 for 8-bit files, as both decode with libjpeg-turbo / libpng (measured
bit-identical, including libjpeg-turbo's recovery from garbled scan data) and the resampling is an
identity; 1 for 16-bit RGB PNGs, which PIL reduces to 8 bits by keeping the high byte and DALI by
rounding v * 255 / 65535. Training crops go through a real bilinear resize of the same window: 1
level inside (PIL's fixed-point taps and 8-bit intermediate against DALI's float, as in
tests/test_data.py), and up to 12 on the outer ring of pixels, where the antialiasing filter runs
off the crop: PIL renormalises the taps that remain, DALI repeats the edge pixel (measured: 9).
"""
from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from gfnet.data import make_loader, make_sample_tree
from gfnet.data.validate import inspect_encoded, jpeg_structure

pytest.importorskip("nvidia.dali")

S = 32
BACKENDS = ("dali", "torchvision")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GFNET_CACHE_DIR", str(tmp_path / "cache"))


def photo(width=48, height=32, seed=0) -> Image.Image:
    """A smooth colour image with some texture (so that a shift or a rotation shows)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x * y) % 256], -1)
    rgb = np.clip(rgb + rng.integers(-20, 21, rgb.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def scan_start(data: bytes) -> int:
    """Byte offset where a JPEG's image data (after its first scan header) begins."""
    k = data.index(b"\xff\xda")
    return k + 2 + ((data[k + 2] << 8) | data[k + 3])


def png16(array: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (PIL cannot write one), rows unfiltered."""
    h, w, _ = array.shape

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + array[r].astype(">u2").tobytes() for r in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def huge_png(side: int) -> bytes:
    """A 1-bit black PNG of side x side pixels: a header announcing ``side**2`` pixels, a few kB of data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def write_val(root, files: dict[str, bytes]) -> dict[str, str]:
    """Write each file into its own class folder of root/val; name -> path."""
    paths = {}
    for k, (name, data) in enumerate(sorted(files.items())):
        d = root / "val" / f"c{k:03d}"
        d.mkdir(parents=True)
        (d / name).write_bytes(data)
        paths[name] = str(d / name)
    return paths


def read_both(root, **kw):
    """Per backend: ({path: uint8 Tensor[3, S, S]}, {path: skip reason}) of an evaluation epoch."""
    out = {}
    for backend in BACKENDS:
        loader = make_loader(root, train=False, batch_size=4, image_size=S, crop_pct=1.0, backend=backend,
                             output="uint8", num_threads=0 if backend == "torchvision" else 1, **kw)
        images = [x for x, _ in loader]
        images = torch.cat(images) if images else torch.empty(0, 3, S, S, dtype=torch.uint8)
        skipped = dict(loader.stats.skipped)
        kept = [p for p in loader.index.files if p not in skipped]
        assert len(kept) == len(images)
        out[backend] = (dict(zip(kept, images)), skipped)
    return out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.int() - b.int()).abs().max())


def test_exif_orientation_is_ignored_by_both_backends(tmp_path):
    img = photo(48, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    paths = write_val(tmp_path, {"rotated.jpg": jpeg_bytes(img, exif=exif.tobytes()), "plain.jpg": jpeg_bytes(img)})
    with Image.open(paths["rotated.jpg"]) as check:
        assert check.getexif()[0x0112] == 6
        reference = torch.from_numpy(np.array(check.convert("RGB"))).permute(2, 0, 1)[:, :, 8:40]  # no rotation
    got = read_both(tmp_path)
    for backend in BACKENDS:
        images, skipped = got[backend]
        assert not skipped
        assert max_diff(images[paths["rotated.jpg"]], reference) == 0, backend
        assert torch.equal(images[paths["rotated.jpg"]], images[paths["plain.jpg"]])


def test_16bit_grayscale_png_is_skipped_by_both_with_one_reason(tmp_path):
    gray = np.linspace(0, 65535, 32 * 48).reshape(32, 48).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    rgb16 = np.random.default_rng(1).integers(0, 65536, (32, 48, 3)).astype(np.uint16)
    paths = write_val(tmp_path, {"gray16.png": buf.getvalue(), "rgb16.png": png16(rgb16),
                                 "ok.jpg": jpeg_bytes(photo())})
    with Image.open(paths["gray16.png"]) as check:
        assert check.mode == "I;16"
        assert (np.array(check.convert("RGB")) == 255).mean() > 0.99  # what the reference would train on
    got = read_both(tmp_path)
    reasons = [got[b][1].get(paths["gray16.png"]) for b in BACKENDS]
    assert reasons[0] == reasons[1] and "16-bit grayscale" in reasons[0] and "convert" in reasons[0]
    # 16-bit RGB: PIL keeps the high byte, DALI rounds to 8 bits: one level apart at most.
    with Image.open(paths["rgb16.png"]) as check:
        reference = torch.from_numpy(np.array(check.convert("RGB"))).permute(2, 0, 1)[:, :, 8:40]
    assert max_diff(got["torchvision"][0][paths["rgb16.png"]], reference) == 0
    assert max_diff(got["dali"][0][paths["rgb16.png"]], reference) <= 1
    assert torch.equal(got["dali"][0][paths["ok.jpg"]], got["torchvision"][0][paths["ok.jpg"]])


def test_jpeg_corrupted_in_the_middle(tmp_path):
    good = jpeg_bytes(photo(48, 32, seed=2))
    start = scan_start(good)
    mid = (start + len(good)) // 2
    # A stray marker inside the image data: libjpeg stops with a fatal error, so PIL raises, while
    # DALI's decoder keeps the rows it had decoded.
    stray = bytearray(good)
    stray[mid - 1:mid + 2] = b"\x00\xff\x02"
    # Garbled bytes holding no marker: libjpeg recovers (a warning), identically in both decoders.
    garbled = bytearray(good)
    noise = np.random.default_rng(3).integers(0, 255, 24).astype(np.uint8)  # no 0xFF: no marker
    garbled[mid:mid + 24] = noise.tobytes()
    paths = write_val(tmp_path, {"stray.jpg": bytes(stray), "garbled.jpg": bytes(garbled), "good.jpg": good})
    with pytest.raises(OSError), Image.open(paths["stray.jpg"]) as check:
        check.load()
    with Image.open(paths["garbled.jpg"]) as check:
        check.load()
        assert np.abs(np.asarray(check, dtype=int) - np.asarray(Image.open(io.BytesIO(good)), dtype=int)).max() > 0
    got = read_both(tmp_path)
    reasons = [got[b][1].get(paths["stray.jpg"]) for b in BACKENDS]
    assert reasons[0] == reasons[1] and "corrupt JPEG: marker 0xFF02" in reasons[0]
    for name in ("garbled.jpg", "good.jpg"):
        assert max_diff(got["dali"][0][paths[name]], got["torchvision"][0][paths[name]]) == 0, name


def test_random_mid_file_corruptions_get_one_verdict(tmp_path):
    # Seeded corruptions of the kinds met on disks and in transfers: both backends must decode each
    # file to the same pixels, or both skip it.
    rng = np.random.default_rng(5)
    good = [jpeg_bytes(photo(48, 32, seed=s), progressive=bool(s % 2)) for s in range(2)]
    files = {}
    for k in range(24):
        data = bytearray(good[k % 2])
        pos = int(rng.integers(scan_start(data), len(data) - 8))
        n = int(rng.integers(1, 40))
        kind = k % 3
        if kind == 0:
            data[pos:pos + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        elif kind == 1:
            data[pos:pos + n] = b"\xff" * n
        else:
            del data[pos:pos + n]
        files[f"x{k:02d}.jpg"] = bytes(data)
    paths = write_val(tmp_path, files)
    got = read_both(tmp_path)
    (dali, dali_skipped), (tv, tv_skipped) = got["dali"], got["torchvision"]
    assert set(dali_skipped) == set(tv_skipped)
    assert dali.keys() == tv.keys() and len(dali) + len(dali_skipped) == len(paths)
    assert 0 < len(dali_skipped) < len(paths)  # the seed makes both kinds of outcome
    for path in dali:
        assert max_diff(dali[path], tv[path]) == 0, path


def test_png_corrupted_in_the_middle_is_skipped_by_both_with_one_reason(tmp_path):
    buf = io.BytesIO()
    photo(48, 32, seed=6).save(buf, format="PNG")
    good = buf.getvalue()
    k = good.index(b"IDAT")
    end = k + 4 + int.from_bytes(good[k - 4:k], "big")
    # A bad CRC on the image data: PIL never checks it (and decodes the file), libpng rejects it.
    bad_crc = good[:end] + bytes(4) + good[end + 4:]
    # Garbled compressed data (its CRC no longer matches either).
    garbled = bytearray(good)
    garbled[k + 20:k + 30] = bytes(10)
    paths = write_val(tmp_path, {"bad_crc.png": bad_crc, "garbled.png": bytes(garbled), "good.png": good})
    with Image.open(paths["bad_crc.png"]) as check:
        check.load()  # the reference pipeline would train on it
    got = read_both(tmp_path)
    for name in ("bad_crc.png", "garbled.png"):
        reasons = [got[b][1].get(paths[name]) for b in BACKENDS]
        assert reasons[0] == reasons[1] and "corrupt PNG: bad CRC in chunk b'IDAT'" in reasons[0], name
    assert torch.equal(got["dali"][0][paths["good.png"]], got["torchvision"][0][paths["good.png"]])


def test_image_over_the_decompression_bomb_limit_is_refused_by_both(tmp_path):
    side = 14000  # 196 M pixels > 2 * PIL.Image.MAX_IMAGE_PIXELS (178.9 M)
    # A JPEG whose frame header announces side x side pixels (its data is that of a small image).
    small = bytearray(jpeg_bytes(photo()))
    sof = small.index(b"\xff\xc0")
    small[sof + 5:sof + 9] = struct.pack(">HH", side, side)
    paths = write_val(tmp_path, {"huge.png": huge_png(side), "huge.jpg": bytes(small), "ok.jpg": jpeg_bytes(photo())})
    assert os.path.getsize(paths["huge.png"]) < 100_000
    assert side * side > 2 * Image.MAX_IMAGE_PIXELS
    for name in ("huge.png", "huge.jpg"):
        with pytest.raises(Image.DecompressionBombError):
            Image.open(paths[name])
    got = read_both(tmp_path)
    for name in ("huge.png", "huge.jpg"):
        reasons = [got[b][1].get(paths[name]) for b in BACKENDS]
        assert reasons[0] == reasons[1] and "decompression-bomb limit" in reasons[0], name
        assert str(side * side) in reasons[0]
    assert torch.equal(got["dali"][0][paths["ok.jpg"]], got["torchvision"][0][paths["ok.jpg"]])


def test_jpeg_structure_accepts_valid_files_and_reads_their_size():
    for kw in ({}, {"progressive": True}, {"subsampling": 0}, {"restart_marker_blocks": 2},
               {"exif": Image.Exif().tobytes()}):
        data = jpeg_bytes(photo(50, 30), **kw)
        assert jpeg_structure(data) == (None, 50, 30), kw
    gray = jpeg_bytes(photo(50, 30).convert("L"))
    check = inspect_encoded(gray)
    assert check.reason is None and (check.width, check.height) == (50, 30)
    assert "no end-of-image" in jpeg_structure(jpeg_bytes(photo())[:-2])[0]


def test_training_batches_agree_between_backends(tmp_path):
    # The crop windows and flips are drawn on the host from the batch's seed: both backends cut the
    # same windows, so their training batches differ only by resampling rounding.
    tree = make_sample_tree(tmp_path / "t", num_classes=2, train_per_class=6, val_per_class=1, photo_size=(80, 60),
                            seed=4)
    out = {}
    for backend in BACKENDS:
        loader = make_loader(tree.root, train=True, batch_size=4, image_size=S, backend=backend, output="uint8",
                             interpolation="bilinear", num_threads=0 if backend == "torchvision" else 1, seed=9)
        loader.set_epoch(3)
        out[backend] = [(x, y) for x, y in loader]
    assert len(out["dali"]) == len(out["torchvision"]) == 3
    for (xd, yd), (xt, yt) in zip(out["dali"], out["torchvision"]):
        assert torch.equal(yd, yt)
        assert max_diff(xd[:, :, 1:-1, 1:-1], xt[:, :, 1:-1, 1:-1]) <= 1  # same window, same flip
        assert max_diff(xd, xt) <= 12 and (xd.float() - xt.float()).abs().mean() <= 0.3
