"""Every shard takes the same number of steps, whatever fails to decode; epochs are reproducible.

- A training batch whose files fail to decode is refilled from the shard's spares, never dropped:
  every rank yields ``len(loader)`` full batches (else the other DDP ranks wait forever in their
  all-reduce). Checked with two shards in one process and with two real gloo processes.
- A batch is a function of (seed, epoch, shard, position, bad files) only: a run resumed in new
  worker processes (torchvision) or a new pipeline (DALI) reads what an uninterrupted one reads,
  whether a bad file was found in an earlier epoch or is found now.
- Loader threads default to this machine's CPUs divided by torchrun's LOCAL_WORLD_SIZE.
"""
from __future__ import annotations

import datetime
import os
import socket

import numpy as np
import pytest
import torch

from gfnet.data import default_num_threads, index_split, make_loader, make_sample_tree
from gfnet.data import index as index_module
from gfnet.data.sharding import ShardPlan, shard_batches

pytest.importorskip("nvidia.dali")

S = 24
BACKENDS = ("dali", "torchvision")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    return make_sample_tree(root, num_classes=3, train_per_class=6, val_per_class=2, photo_size=(48, 36), seed=2)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GFNET_CACHE_DIR", str(tmp_path / "cache"))


def copy_tree(tree, dst) -> str:
    import shutil

    shutil.copytree(tree.root, dst)
    return str(dst)


def corrupt(path: str) -> None:
    """Put a stray marker in the middle of a JPEG's image data: the file keeps its size and its end
    marker (so indexing passes it), and libjpeg stops on it (PIL raises; both backends skip it)."""
    data = bytearray(open(path, "rb").read())
    k = data.index(b"\xff\xda")
    mid = (k + len(data)) // 2
    data[mid - 1:mid + 2] = b"\x00\xff\x02"
    with open(path, "wb") as fh:
        fh.write(data)


def make(root, backend, **kw):
    kw.setdefault("num_threads", 0 if backend == "torchvision" else 1)
    return make_loader(root, train=True, image_size=S, backend=backend, output="uint8", **kw)


def epoch(loader, e):
    loader.set_epoch(e)
    return [(x.clone(), y.clone()) for x, y in loader]


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_shard_whose_whole_batch_is_corrupt_still_takes_every_step(tree, tmp_path, backend):
    root = copy_tree(tree, tmp_path / "data")
    files = index_split(root, "train").files
    seed, batch = 5, 2
    doomed = shard_batches(len(files), batch, True, shard_id=1, num_shards=2, seed=seed, epoch=0)[0]
    for i in doomed.tolist():
        corrupt(files[i])
    shards = [make(root, backend, batch_size=batch, shard_id=r, num_shards=2, seed=seed) for r in range(2)]
    got = [epoch(s, 0) for s in shards]
    assert len(shards[0]) == len(shards[1]) == len(files) // 2 // batch
    assert [len(g) for g in got] == [len(shards[0])] * 2  # same steps on every rank
    assert all(len(y) == batch and x.shape == (batch, 3, S, S) for g in got for x, y in g)
    assert {p for p, _ in shards[1].stats.skipped} == {files[i] for i in doomed.tolist()}
    assert all("corrupt JPEG" in reason for _, reason in shards[1].stats.skipped)
    # The refill is the shard's next images of the epoch: the two cut off its last full batch.
    spares = ShardPlan(len(files), batch, True, 1, 2, seed).spares(0, 0)
    labels = index_split(root, "train").labels
    assert got[1][0][1].tolist() == [labels[i] for i in spares[:batch].tolist()]


def _gloo_rank(rank, world, port, root, backend, seed, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GFNET_CACHE_DIR=os.path.join(out, "cache"))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=30))
    try:
        loader = make(root, backend, batch_size=2, shard_id=rank, num_shards=world, seed=seed)
        steps = 0
        for images, _ in loader:
            total = torch.tensor([float(images.shape[0])])
            torch.distributed.all_reduce(total)  # a rank with a step fewer leaves the other waiting here
            steps += 1
        torch.save({"steps": steps, "planned": len(loader)}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("backend", ["torchvision"])
def test_ddp_ranks_take_the_same_steps_when_one_rank_meets_a_corrupt_batch(tree, tmp_path, backend):
    import torch.multiprocessing as mp

    root = copy_tree(tree, tmp_path / "data")
    files = index_split(root, "train").files
    seed = 5
    for i in shard_batches(len(files), 2, True, shard_id=1, num_shards=2, seed=seed, epoch=0)[0].tolist():
        corrupt(files[i])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gloo_rank, args=(2, port, root, backend, seed, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert results[0] == results[1] == {"steps": len(files) // 2 // 2, "planned": len(files) // 2 // 2}


@pytest.mark.parametrize("backend", BACKENDS)
def test_refilled_batches_do_not_depend_on_when_a_bad_file_was_found(tree, tmp_path, backend):
    root = copy_tree(tree, tmp_path / "data")
    files = index_split(root, "train").files
    seed, batch = 3, 4
    bad = [1, 8, 13]
    for i in bad:
        corrupt(files[i])
    planned = np.concatenate(shard_batches(len(files), batch, True, seed=seed, epoch=1))
    assert set(bad) & set(planned.tolist())  # epoch 1 meets a bad file: not a vacuous comparison

    continuing = make(root, backend, batch_size=batch, seed=seed)
    epoch(continuing, 0)  # finds the bad files met in epoch 0; epoch 1 leaves them out of its plan
    fresh = make(root, backend, batch_size=batch, seed=seed)  # a resumed run: finds them in epoch 1
    a, b = epoch(continuing, 1), epoch(fresh, 1)
    assert same_batches(a, b)
    assert len(a) == len(continuing) and all(len(y) == batch for _, y in a)
    assert {p for p, _ in continuing.stats.skipped} == {files[i] for i in bad}


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_epoch_is_the_same_in_a_new_process_as_after_earlier_epochs(tree, backend):
    # torchvision with worker processes (the default): before the crops were drawn per batch, a
    # resumed run's new workers drew other crops than the uninterrupted run's.
    workers = 2 if backend == "torchvision" else 1
    straight = make(tree.root, backend, batch_size=4, num_threads=workers, seed=11)
    for e in range(2):
        epoch(straight, e)
    if backend == "dali":
        pipeline = straight._pipe
    third = epoch(straight, 2)
    resumed = make(tree.root, backend, batch_size=4, num_threads=workers, seed=11)
    assert same_batches(third, epoch(resumed, 2))
    assert not same_batches(third, epoch(resumed, 1))
    if backend == "dali":
        assert straight._pipe is pipeline  # kept across epochs, not built again


def test_dali_loops_left_mid_epoch_or_open_together_do_not_mix(tree):
    # The pipeline is kept across epochs: a loop left with batches still scheduled in it, or a
    # second loop opened while the first is open, must not receive the other's batches.
    a = make(tree.root, "dali", batch_size=2, seed=1)
    b = make(tree.root, "dali", batch_size=2, seed=1)
    expected = {e: epoch(b, e) for e in (0, 1)}
    a.set_epoch(0)
    for _ in a:
        break
    assert same_batches(epoch(a, 1), expected[1])
    a.set_epoch(0)
    first = iter(a)
    head = [tuple(t.clone() for t in next(first))]
    assert same_batches(epoch(a, 1), expected[1])  # while `first` is still open
    assert same_batches(head + [(x.clone(), y.clone()) for x, y in first], expected[0])


def test_dali_decode_errors_are_isolated_and_refilled(tmp_path, monkeypatch):
    # Files that pass every check on the host but that DALI's decoder rejects: the pipeline fails,
    # the batch's files are run one by one to find the culprits, and the batch is refilled.
    from gfnet.data import validate
    from gfnet.data.validate import EncodedImage

    tree = make_sample_tree(tmp_path / "t", num_classes=2, train_per_class=5, val_per_class=1, photo_size=(48, 36),
                            bad_files=True, seed=3)
    monkeypatch.setattr(index_module, "check_image_file", lambda p: (None, os.path.getsize(p)))
    monkeypatch.setattr(validate, "inspect_encoded", lambda data: EncodedImage(None, 8, 8))
    loader = make(tree.root, "dali", batch_size=3, seed=2)
    got = epoch(loader, 0)
    assert len(got) == len(loader) == (10 + 6) // 3 and all(len(y) == 3 for _, y in got)
    reasons = dict(loader.stats.skipped)
    for f in tree.invalid_files("train"):
        path = os.path.join(tree.root, f.relpath)
        if path in reasons:  # the plan may not reach every file in one epoch
            assert reasons[path].startswith("empty file" if f.kind == "empty" else "DALI cannot decode it"), reasons
    assert len(reasons) >= 2


def test_loader_threads_are_shared_by_the_local_processes(tree, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_num_threads() == 4
    assert make_loader(tree.root, train=True, batch_size=2, backend="torchvision").num_threads == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert default_num_threads() == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert default_num_threads() == 8
