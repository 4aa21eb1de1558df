"""Which images each shard reads in an epoch, and in which batches (shared by every backend).

Training (as DistributedSampler with drop_last): all shards draw the same permutation of the split
from (seed, epoch); shard k takes every num_shards-th image of it starting at k, cut to
``len(files) // num_shards`` images so that all shards hold the same number, then only full
batches are kept. A new epoch (``set_epoch``) gives a new permutation.

Every shard therefore plans the same number of training batches, and it must yield exactly that
many full batches, or the other processes of a DDP run wait forever in their all-reduce. A file
that fails to decode is replaced, never dropped: batch b takes replacements from the shard's images
of the epoch that follow it (through those cut off after the last full batch), wrapping round to
the shard's first image; see :meth:`ShardPlan.spares`. Replacements depend only on the plan and on
which files are bad, not on when a bad file was found, so a resumed run reads what an uninterrupted
one reads.

Evaluation: the split in index order is cut into num_shards contiguous runs whose lengths differ by
at most one; each shard reads its run in order, the last batch possibly partial. Every image is read
exactly once across shards (shards may differ by one batch: gather results after the loop); a file
that fails to decode is left out, never replaced.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def shard_order(num_files: int, train: bool, shard_id: int = 0, num_shards: int = 1, seed: int = 0,
                epoch: int = 0) -> np.ndarray:
    """This shard's images of the epoch in reading order: int64 indices into the split's file list."""
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"need 0 <= shard_id < num_shards, got shard_id={shard_id}, num_shards={num_shards}")
    if train:
        order = np.random.default_rng([seed, epoch]).permutation(num_files)
        return order[shard_id::num_shards][:num_files // num_shards]
    return np.array_split(np.arange(num_files, dtype=np.int64), num_shards)[shard_id]


def shard_batches(num_files: int, batch_size: int, train: bool, shard_id: int = 0, num_shards: int = 1,
                  seed: int = 0, epoch: int = 0) -> list[np.ndarray]:
    """The batches of file indices that shard `shard_id` reads in epoch `epoch`.

    Returns:
        A list of int64 arrays of indices into the split's file list; in training each has
        `batch_size` entries, in evaluation the last may be shorter.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    mine = shard_order(num_files, train, shard_id, num_shards, seed, epoch)
    if train:
        return [mine[i * batch_size:(i + 1) * batch_size] for i in range(len(mine) // batch_size)]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


@dataclass(frozen=True)
class PlannedBatch:
    """One batch of an epoch's plan, as handed to a backend (small: it crosses to worker processes).

    Attributes:
        epoch, position: the epoch and the batch's number in it (0-based).
        files: int64 indices of the planned files, those already known to be bad left out.
        size: images the batch must hold: ``batch_size`` in training (refilled from
            :meth:`ShardPlan.spares`), ``len(files)`` in evaluation (never refilled).
        seed: seed of the batch's random crops and flips (training).
        bad: indices of the files known to be bad when the epoch began (skipped among the spares).
    """

    epoch: int
    position: int
    files: np.ndarray
    size: int
    seed: int
    bad: frozenset = frozenset()


@dataclass
class ShardPlan:
    """The plan of one shard of one split: its batches per epoch and where they find replacements."""

    num_files: int
    batch_size: int
    train: bool
    shard_id: int = 0
    num_shards: int = 1
    seed: int = 0

    def __post_init__(self):
        self._cached: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        """:func:`shard_order` of `epoch` (the last one asked for is kept: a permutation of ImageNet costs 20 ms)."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, shard_order(self.num_files, self.train, self.shard_id, self.num_shards,
                                               self.seed, epoch))
        return self._cached[1]

    def batches(self, epoch: int, bad: frozenset = frozenset()) -> list[PlannedBatch]:
        """The epoch's batches; files in `bad` are left out (training batches are then refilled)."""
        out = []
        for position, files in enumerate(shard_batches(self.num_files, self.batch_size, self.train, self.shard_id,
                                                       self.num_shards, self.seed, epoch)):
            size = self.batch_size if self.train else len(files)
            if bad:
                files = files[[i not in bad for i in files.tolist()]]
                if not self.train:
                    size = len(files)
            if size:
                out.append(PlannedBatch(epoch, position, files, size, self.batch_seed(epoch, position), bad))
        return out

    def spares(self, epoch: int, position: int) -> np.ndarray:
        """Replacement candidates of training batch `position`, in the order they are taken.

        The shard's images of the epoch after the batch, wrapping round to its start (int64);
        empty in evaluation.
        """
        if not self.train:
            return np.zeros(0, dtype=np.int64)
        order = self.order(epoch)
        return np.concatenate([order[(position + 1) * self.batch_size:], order[:position * self.batch_size]])

    def batch_seed(self, epoch: int, position: int) -> int:
        """The seed of one batch's augmentations: a function of (seed, epoch, shard, position) only."""
        return int(np.random.default_rng([self.seed, epoch, self.shard_id, position, 7]).integers(2**63 - 1))


def fill_batch(batch: PlannedBatch, spares, load, bad=None):
    """Load a planned batch's files, replacing those that fail from the spares until ``batch.size`` are loaded.

    The result is the batch's good planned files in order, then good spares in order: the same
    whether a bad file was known before (left out of the plan) or is found now.

    Args:
        batch: the planned batch.
        spares: ``spares() -> int64 array``, the replacement candidates in order
            (:meth:`ShardPlan.spares`); called only when a replacement is needed.
        load: ``load(index) -> (item, reason)``; reason None when the file loaded.
        bad: files to skip without loading (default ``batch.bad``).

    Returns:
        (loaded, failures): ``loaded`` a list of (index, item), at most ``batch.size`` long (shorter
        in training only when the shard has run out of good images); ``failures`` (index, reason)
        of the files that failed to load.
    """
    bad = batch.bad if bad is None else bad
    loaded, failures = [], []

    def candidates():
        yield from batch.files.tolist()
        more = spares()
        for start in range(0, len(more), 256):  # converted in chunks: a shard of ImageNet holds 10^5 spares
            yield from more[start:start + 256].tolist()

    if batch.size == 0:
        return loaded, failures
    for i in candidates():  # the spares are computed only when the planned files fall short
        if i in bad:
            continue
        item, reason = load(i)
        if reason is not None:
            failures.append((i, reason))
            continue
        loaded.append((i, item))
        if len(loaded) == batch.size:
            break
    return loaded, failures
