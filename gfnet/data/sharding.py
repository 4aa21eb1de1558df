"""Which images each shard reads in an epoch, and in which batches (shared by every backend).

Training (as DistributedSampler with drop_last): all shards draw the same permutation of the split
from (seed, epoch); shard k takes every num_shards-th image of it starting at k, cut to
``len(files) // num_shards`` images so that all shards hold the same number, then only full
batches are kept. A new epoch (``set_epoch``) gives a new permutation.

Evaluation: the split in index order is cut into num_shards contiguous runs whose lengths differ by
at most one; each shard reads its run in order, the last batch possibly partial. Every image is read
exactly once across shards (shards may differ by one batch: gather results after the loop).
"""
from __future__ import annotations

import numpy as np


def shard_batches(num_files: int, batch_size: int, train: bool, shard_id: int = 0, num_shards: int = 1,
                  seed: int = 0, epoch: int = 0) -> list[np.ndarray]:
    """The batches of file indices that shard `shard_id` reads in epoch `epoch`.

    Returns:
        A list of int64 arrays of indices into the split's file list; in training each has
        `batch_size` entries, in evaluation the last may be shorter.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"need 0 <= shard_id < num_shards, got shard_id={shard_id}, num_shards={num_shards}")
    if train:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(num_files)
        per_shard = num_files // num_shards
        mine = order[shard_id::num_shards][:per_shard]
        nb = per_shard // batch_size
        return [mine[i * batch_size:(i + 1) * batch_size] for i in range(nb)]
    mine = np.array_split(np.arange(num_files, dtype=np.int64), num_shards)[shard_id]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
