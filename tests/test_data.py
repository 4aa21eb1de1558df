"""gfnet.data: both backends on a sample tree with ImageNet's kinds of bad files.

CPU only (DALI with device_id=None), except the `cuda`-marked GPU pipeline test.
"""
from __future__ import annotations

import hashlib
import logging
import os

import numpy as np
import pytest
import torch

from gfnet.data import IMAGENET_MEAN, IMAGENET_STD, index_split, make_loader, make_sample_tree
from gfnet.data import index as index_module
from gfnet.data.sharding import shard_batches

pytest.importorskip("nvidia.dali")

S = 32  # output side: tiny images keep the whole file under a minute on two cores
BACKENDS = ["dali", "torchvision"]
INVALID = {"empty", "truncated", "not_an_image"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    return make_sample_tree(root, num_classes=3, train_per_class=6, val_per_class=5, photo_size=(80, 60),
                            bad_files=True, seed=1)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    # Each test gets its own index cache, so none depends on another's.
    monkeypatch.setenv("GFNET_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def loader(tree, backend, train=False, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("num_threads", 0 if backend == "torchvision" else 2)  # 0: no worker processes to start
    return make_loader(tree.root, train=train, image_size=S, backend=backend, **kw)


def expected_labels(tree, split):
    """Labels by folder name from what the sample writer says it wrote, in path order."""
    files = sorted(tree.valid_files(split), key=lambda f: f.relpath)
    return [tree.classes.index(f.class_name) for f in files]


def signatures(images: torch.Tensor) -> list[str]:
    return [hashlib.sha1(img.contiguous().numpy().tobytes()).hexdigest() for img in images]


# ---------------------------------------------------------------------------------------------- sample tree

def test_sample_tree_writes_real_jpegs_and_bad_files(tree):
    from PIL import Image

    assert tree.empty_classes and tree.empty_classes[0] in tree.classes
    assert tree.classes == sorted(tree.classes)
    kinds = {f.kind for f in tree.files["val"]}
    assert {"photo", "grayscale", "cmyk", "png_as_jpeg"} | INVALID == kinds
    photo = next(f for f in tree.files["train"] if f.kind == "photo")
    with Image.open(os.path.join(tree.root, photo.relpath)) as img:
        assert img.format == "JPEG" and img.mode == "RGB"
        assert 60 * 0.8 <= min(img.size) and max(img.size) <= 80 * 1.2
    with Image.open(os.path.join(tree.root, next(f.relpath for f in tree.files["val"] if f.kind == "cmyk"))) as img:
        assert img.mode == "CMYK"
    empty = next(f.relpath for f in tree.files["val"] if f.kind == "empty")
    assert os.path.getsize(os.path.join(tree.root, empty)) == 0


def test_cli_make_sample(tmp_path, capsys):
    from gfnet.cli.data import main

    assert main(["make-sample", str(tmp_path), "--classes", "2", "--train-per-class", "2", "--val-per-class", "1",
                 "--width", "40", "--height", "30", "--source", "digits"]) == 0
    assert sorted(os.listdir(tmp_path / "train")) == ["n01000000", "n01000007"]
    assert len(os.listdir(tmp_path / "val" / "n01000007")) == 1
    assert main(["index", str(tmp_path)]) == 0
    assert "2 valid images" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------- index

def test_index_labels_skips_and_empty_class(tree):
    index = index_split(tree.root, "val")
    assert index.classes == tree.classes  # the empty class folder keeps its place among the labels
    assert index.empty_classes == tree.empty_classes
    assert index.labels == expected_labels(tree, "val")
    assert index.labels[-1] == 3  # the last class sorts after the empty one: label 3, not 2
    skipped = {os.path.relpath(p, tree.root): reason for p, reason in index.skipped}
    assert set(skipped) == {f.relpath for f in tree.invalid_files("val")}
    assert any("empty" in r for r in skipped.values()) and any("truncated" in r for r in skipped.values())


def test_index_cache_is_reused_and_refreshed_when_a_folder_changes(tree, monkeypatch, tmp_path):
    first = index_split(tree.root, "train")
    calls = []

    def counting_check(path):
        calls.append(path)
        return (None, os.path.getsize(path)) if os.path.getsize(path) else ("empty file", 0)

    monkeypatch.setattr(index_module, "check_image_file", counting_check)
    again = index_split(tree.root, "train")
    assert calls == [] and again.files == first.files and again.skipped == first.skipped

    # A new file changes its class folder's mtime: only that folder is validated again.
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(tree.root, root)
    index_split(root, "train")
    cdir = root / "train" / tree.classes[0]
    before = os.stat(cdir).st_mtime_ns
    (cdir / "new.JPEG").write_bytes((cdir / sorted(os.listdir(cdir))[0]).read_bytes())
    os.utime(cdir, ns=(before + 10**9, before + 10**9))  # coarse-mtime filesystems
    calls.clear()
    index = index_split(root, "train")
    assert {os.path.dirname(p) for p in calls} == {str(cdir)}
    assert str(cdir / "new.JPEG") in index.files


@pytest.mark.parametrize("damage", ["truncated", "garbage", "binary", "old_version", "json_list", "bad_entries",
                                    "other_folder"])
def test_malformed_index_cache_is_reported_once_and_rebuilt(tree, cache_dir, damage, monkeypatch, caplog):
    import json

    first = index_split(tree.root, "train")
    cpath = index_module.cache_path(os.path.join(tree.root, "train"))
    good = open(cpath, "rb").read()
    data = json.loads(good)
    damaged = {
        "truncated": good[: len(good) // 2],
        "garbage": b"this is not an index {[",
        "binary": bytes(range(256)) * 4,
        "old_version": json.dumps({**data, "version": 0}).encode(),
        "json_list": b"[1, 2, 3]",
        "bad_entries": json.dumps({**data, "classes": {c: {"mtime_ns": v["mtime_ns"], "entries": "x"}
                                                       for c, v in data["classes"].items()}}).encode(),
        "other_folder": json.dumps({**data, "split_dir": "/somewhere/else"}).encode(),
    }[damage]
    with open(cpath, "wb") as fh:
        fh.write(damaged)
    with caplog.at_level(logging.WARNING, logger="gfnet.data"):
        again = index_split(tree.root, "train")
        loader(tree, "dali", train=True)  # the loader works on the rebuilt index
    assert again.files == first.files and again.labels == first.labels and again.skipped == first.skipped
    warnings = [r for r in caplog.records if "index cache" in r.getMessage()]
    assert len(warnings) == 1 and cpath in warnings[0].getMessage()
    assert json.loads(open(cpath, "rb").read()) == data  # rewritten whole
    assert not [n for n in os.listdir(os.path.dirname(cpath)) if n.endswith(".tmp")]

    # Rebuilt: the next run reads it again without a word and without validating a file.
    calls = []
    monkeypatch.setattr(index_module, "check_image_file", lambda p: calls.append(p))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gfnet.data"):
        assert index_split(tree.root, "train").files == first.files
    assert calls == [] and caplog.text == ""


def test_make_sample_refuses_a_folder_that_holds_other_data(tmp_path, capsys):
    from gfnet.cli.data import main

    root = tmp_path / "imagenet"
    (root / "train" / "n99999999").mkdir(parents=True)
    (root / "train" / "n99999999" / "mine.JPEG").write_bytes(b"user data")
    before = sorted(str(p) for p in root.rglob("*"))
    with pytest.raises(FileExistsError, match="not empty"):
        make_sample_tree(root, num_classes=2, train_per_class=1, val_per_class=1, photo_size=(16, 12))
    assert main(["make-sample", str(root), "--classes", "2", "--train-per-class", "1", "--val-per-class", "1",
                 "--width", "16", "--height", "12"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gfnet-data: error: ")
    assert "not empty" in err and "Traceback" not in err
    assert sorted(str(p) for p in root.rglob("*")) == before  # nothing written
    (tmp_path / "afile").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not a folder"):
        make_sample_tree(tmp_path / "afile")


def test_make_sample_replaces_an_earlier_sample_only(tmp_path):
    root = tmp_path / "sample"
    first = make_sample_tree(root, num_classes=3, train_per_class=2, val_per_class=1, photo_size=(16, 12),
                             bad_files=True)
    # Written again with fewer classes: the earlier sample is replaced, no stale class folder stays.
    second = make_sample_tree(root, num_classes=2, train_per_class=1, val_per_class=1, photo_size=(16, 12))
    assert sorted(os.listdir(root / "train")) == second.classes != first.classes
    assert index_split(root, "train").classes == second.classes
    os.remove(os.path.join(root, second.files["train"][0].relpath))  # part of a sample is still ours
    make_sample_tree(root, num_classes=2, train_per_class=1, val_per_class=1, photo_size=(16, 12))
    # A file of the user's added to the sample makes the folder theirs: refused.
    extra = root / "val" / second.classes[0] / "mine.JPEG"
    extra.write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="not empty"):
        make_sample_tree(root, num_classes=2, train_per_class=1, val_per_class=1, photo_size=(16, 12))
    assert extra.read_bytes() == b"user data"


def test_missing_root_or_split_names_the_path(tmp_path, tree):
    missing = tmp_path / "no_such_dataset"
    with pytest.raises(FileNotFoundError, match="no_such_dataset"):
        make_loader(missing, train=False, batch_size=2, backend="torchvision")
    (tmp_path / "only_train" / "train" / "c").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"only_train.val"):
        make_loader(tmp_path / "only_train", train=False, batch_size=2, backend="dali")
    with pytest.raises(ValueError, match="no valid image"):
        make_loader(tmp_path / "only_train", train=True, batch_size=2, backend="dali")


# ------------------------------------------------------------------------------------------------- loaders

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [False, True], ids=["val", "train"])
def test_shapes_dtypes_labels_and_counts(tree, backend, train, caplog):
    split = "train" if train else "val"
    with caplog.at_level(logging.WARNING, logger="gfnet.data"):
        f = loader(tree, backend, train)
        u = loader(tree, backend, train, output="uint8")
    valid = len(tree.valid_files(split))
    # Every broken file is reported once per loader made, by path.
    for bad in tree.invalid_files(split):
        assert caplog.text.count(os.path.join(tree.root, bad.relpath)) == 2

    batches = list(f)
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert all(x.dtype == torch.float32 and x.shape[1:] == (3, S, S) and x.is_contiguous() for x, _ in batches)
    assert labels.dtype == torch.int64
    if train:  # partial batch dropped
        assert [len(y) for _, y in batches] == [4] * (valid // 4)
        assert set(labels.tolist()) <= set(expected_labels(tree, "train"))
        assert sorted(labels.tolist()) != labels.tolist() or len(set(labels.tolist())) == 1
    else:  # partial batch kept, index order
        assert [len(y) for _, y in batches] == [4] * (valid // 4) + ([valid % 4] if valid % 4 else [])
        assert labels.tolist() == expected_labels(tree, "val")
    assert len(f) == len(batches) and f.num_samples == len(labels)
    assert f.stats.seen == len(labels) and f.stats.seen_this_epoch == len(labels)
    assert f.stats.num_skipped == len(tree.invalid_files(split)) and f.stats.valid == valid

    # Normalised with ImageNet's mean/std: the uint8 output maps onto the float one.
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert images.min() >= (0 - mean.max()) / std.min() - 1e-4 and images.max() <= (1 - mean.min()) / std.min() + 1e-4

    ubatches = list(u)
    x = ubatches[0][0]
    assert x.dtype == torch.uint8 and x.shape[1:] == (3, S, S)
    assert x.is_contiguous(memory_format=torch.channels_last)  # NCHW view of NHWC memory
    if not train:
        uimages = torch.cat([x for x, _ in ubatches])
        torch.testing.assert_close(((uimages.float() / 255 - mean) / std).contiguous(), images,
                                   atol=1e-4, rtol=0)


# Tolerances of DALI's centre crops against torchvision's, in uint8 levels: (max, mean, share of pixels > 1).
# Both decode with libjpeg-turbo (bit-identical pixels, as checked when this was written) and use the
# same geometry, so only resampling arithmetic differs: PIL uses fixed-point taps and rounds to 8 bits
# between its horizontal and vertical passes, DALI computes in float. Bilinear: off by one at most.
# Bicubic: PIL also clamps the first pass to 0..255, cutting the cubic overshoot at saturated edges
# that DALI keeps until the end, so a few pixels (measured: < 0.05 % on 500x375 photos) differ by up to 7.
CROP_TOLERANCE = {"bilinear": (1, 0.25, 0.0), "bicubic": (8, 0.25, 0.002)}


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_backends_give_the_same_centre_crops(tree, interpolation):
    d = torch.cat([x for x, _ in loader(tree, "dali", output="uint8", interpolation=interpolation, batch_size=64)])
    t = torch.cat([x for x, _ in loader(tree, "torchvision", output="uint8", interpolation=interpolation,
                                        batch_size=64)])
    assert d.shape == t.shape == (len(tree.valid_files("val")), 3, S, S)
    diff = (d.int() - t.int()).abs()
    max_levels, mean_levels, share_over_one = CROP_TOLERANCE[interpolation]
    assert diff.max().item() <= max_levels, diff.flatten(1).max(1).values
    assert diff.float().mean().item() <= mean_levels
    assert (diff > 1).float().mean().item() <= share_over_one


def test_centre_crop_geometry_matches_torchvision_on_awkward_sizes(tmp_path):
    # Sizes whose resized long side is truncated, not rounded (36 * 55 / 50 = 39.6 -> 39), and whose
    # crop offsets (size - 32) / 2 land on .5 with an odd (39, 43) or even (37, 41) floor: Python's
    # round-half-to-even picks differently there. Noise makes a one-pixel shift show as a large difference.
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, (w, h) in enumerate([(55, 50), (57, 50), (50, 60), (50, 63), (36, 36), (41, 70)]):
        d = tmp_path / "val" / f"c{k}"
        d.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / "x.png")
    out = {b: torch.cat([x for x, _ in make_loader(tmp_path, False, 8, image_size=S, backend=b, output="uint8",
                                                   num_threads=0 if b == "torchvision" else 1)])
           for b in BACKENDS}
    assert (out["dali"].int() - out["torchvision"].int()).abs().max().item() <= CROP_TOLERANCE["bilinear"][0]


def test_grayscale_cmyk_and_png_become_rgb(tree):
    from PIL import Image

    index = index_split(tree.root, "val")
    kinds = {f.kind: os.path.join(tree.root, f.relpath) for f in tree.files["val"]}
    images = torch.cat([x for x, _ in loader(tree, "dali", output="uint8", batch_size=64)])
    for kind in ("grayscale", "cmyk", "png_as_jpeg"):
        img = images[index.files.index(kinds[kind])]
        assert img.shape == (3, S, S)
        with Image.open(kinds[kind]) as src:
            rgb = torch.from_numpy(np.array(src.convert("RGB").resize((S, S)))).permute(2, 0, 1)
        assert (img.float().mean((1, 2)) - rgb.float().mean((1, 2))).abs().max() < 40  # right colours, roughly
    gray = images[index.files.index(kinds["grayscale"])]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_sharding_reads_every_image_exactly_once(tree, backend):
    whole = signatures(torch.cat([x for x, _ in loader(tree, backend, output="uint8", batch_size=3)]))
    assert len(set(whole)) == len(whole) == len(tree.valid_files("val"))  # the signature tells images apart
    for num_shards in (2, 3):
        parts = []
        for shard_id in range(num_shards):
            sh = loader(tree, backend, output="uint8", batch_size=3, shard_id=shard_id, num_shards=num_shards)
            got = [x for x, _ in sh]
            assert sum(len(x) for x in got) == sh.num_samples == sh.stats.seen
            parts += signatures(torch.cat(got))
        assert sorted(parts) == sorted(whole)  # union is everything, no duplicates


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_shards_are_equal_full_and_reshuffled_per_epoch(tree, backend):
    shards = [loader(tree, backend, train=True, batch_size=2, shard_id=k, num_shards=2, output="uint8")
              for k in range(2)]
    assert len(shards[0]) == len(shards[1]) == (len(tree.valid_files("train")) // 2) // 2
    orders = []
    for epoch in range(4):
        shards[0].set_epoch(epoch)
        got = [(x, y) for x, y in shards[0]]
        assert all(len(y) == 2 and x.shape == (2, 3, S, S) for x, y in got)
        orders.append(torch.cat([y for _, y in got]).tolist())
    assert shards[0].stats.seen == 4 * shards[0].num_samples
    assert len({tuple(o) for o in orders}) > 1  # label orders of 4 epochs: all equal only if never reshuffled
    shards[0].set_epoch(0)
    assert torch.cat([y for _, y in shards[0]]).tolist() == orders[0]  # same seed and epoch, same order


def test_train_augmentation_differs_between_epochs(tree):
    # One image, many epochs: random-resized crops differ from each other and from the centre crop.
    f = loader(tree, "dali", train=True, batch_size=1, output="uint8")
    seen = set()
    for epoch in range(6):
        f.set_epoch(epoch)
        seen.update(signatures(torch.cat([x for x, _ in f])))
    assert len(seen) == 6 * f.num_samples


@pytest.mark.parametrize("backend", BACKENDS)
def test_files_that_pass_indexing_but_fail_to_decode_are_skipped(tree, backend, monkeypatch, caplog):
    # Pretend the index check passed everything: the loaders must find the broken files while reading.
    monkeypatch.setattr(index_module, "check_image_file", lambda p: (None, os.path.getsize(p)))
    workers = {"num_threads": 2} if backend == "torchvision" else {}  # failures must cross worker processes
    with caplog.at_level(logging.WARNING, logger="gfnet.data"):
        f = loader(tree, backend, output="uint8", batch_size=3, **workers)
        assert f.stats.num_skipped == 0 and f.stats.valid == len(tree.files["val"])
        labels = torch.cat([y for _, y in f])
    assert labels.tolist() == expected_labels(tree, "val")
    assert f.stats.seen == len(tree.valid_files("val"))
    assert {os.path.relpath(p, tree.root) for p, _ in f.stats.skipped} == {x.relpath for x in tree.invalid_files("val")}
    for bad in tree.invalid_files("val"):
        assert caplog.text.count(os.path.join(tree.root, bad.relpath)) == 1
    # The next epoch leaves them out without trying again.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gfnet.data"):
        assert sum(len(y) for _, y in f) == len(tree.valid_files("val"))
    assert caplog.text == "" and f.stats.num_skipped == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_file_removed_after_indexing_is_skipped(tree, backend, tmp_path, caplog):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(tree.root, root)
    f = make_loader(root, train=False, batch_size=4, image_size=S, backend=backend,
                    num_threads=2 if backend == "dali" else 0)
    gone = f.index.files[5]
    os.remove(gone)
    with caplog.at_level(logging.WARNING, logger="gfnet.data"):
        labels = torch.cat([y for _, y in f])
    assert len(labels) == f.stats.seen == len(tree.valid_files("val")) - 1
    assert f.stats.skipped[-1][0] == gone and caplog.text.count(gone) == 1


def test_bad_arguments_say_what_is_allowed(tree):
    with pytest.raises(ValueError, match="backend"):
        make_loader(tree.root, False, 2, backend="pil")
    with pytest.raises(ValueError, match="shard_id"):
        make_loader(tree.root, False, 2, shard_id=2, num_shards=2)
    with pytest.raises(ValueError, match="output"):
        make_loader(tree.root, False, 2, output="half")


# ----------------------------------------------------------------------------------------------- sharding

@pytest.mark.parametrize("n,batch,shards", [(1, 4, 1), (10, 3, 3), (17, 4, 4), (5, 8, 7), (100, 7, 8)])
def test_shard_batches_eval_exactly_once_and_train_disjoint(n, batch, shards):
    eval_parts = [np.concatenate(shard_batches(n, batch, False, k, shards) or [np.zeros(0, np.int64)])
                  for k in range(shards)]
    assert sorted(np.concatenate(eval_parts).tolist()) == list(range(n))
    train = [shard_batches(n, batch, True, k, shards, seed=3, epoch=1) for k in range(shards)]
    assert len({len(b) for b in train}) == 1 and all(len(x) == batch for b in train for x in b)
    flat = [i for b in train for x in b for i in x.tolist()]
    assert len(flat) == len(set(flat)) == len(train[0]) * batch * shards
    assert not np.array_equal(np.concatenate(shard_batches(n, 1, True, 0, 1, seed=3, epoch=1)),
                              np.concatenate(shard_batches(n, 1, True, 0, 1, seed=3, epoch=2))) or n < 3


# ------------------------------------------------------------------------------------------------------ GPU

@pytest.mark.cuda
@pytest.mark.parametrize("train", [False, True], ids=["val", "train"])
def test_dali_gpu_pipeline(tree, train):
    # nvJPEG (the "mixed" decoder) and libjpeg-turbo differ in IDCT and chroma upsampling, so the GPU's
    # centre crops match the CPU's only on average (a level or two), not pixel for pixel.
    gpu = loader(tree, "dali", train, output="uint8", device="cuda", batch_size=64)
    images, labels = next(iter(gpu))
    assert images.is_cuda and labels.is_cuda and images.dtype == torch.uint8 and images.shape[1:] == (3, S, S)
    floats, _ = next(iter(loader(tree, "dali", train, device="cuda", batch_size=64)))
    assert floats.is_cuda and floats.dtype == torch.float32 and floats.is_contiguous()
    if not train:
        cpu, cpu_labels = next(iter(loader(tree, "dali", train, output="uint8", batch_size=64)))
        assert torch.equal(labels.cpu(), cpu_labels)
        assert (images.cpu().int() - cpu.int()).abs().float().mean().item() <= 2.0
