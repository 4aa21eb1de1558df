"""Batches of an in-memory dataset (the demo's, tests'), sharded and reshuffled like gfnet.data's loaders."""
from __future__ import annotations

import torch

__all__ = ["TensorLoader"]


class TensorLoader:
    """Iterable of ``(images, labels)`` batches over tensors held in memory.

    Args:
        images: Tensor[N, 3, S, S] (float normalised or uint8) on any device.
        labels: Tensor[N] int64.
        batch_size: images per batch of this process (shard).
        train: shuffle every epoch (with ``seed`` and the epoch number, so any epoch's order can be
            replayed: resuming reproduces it) and drop the last incomplete batch; else keep the order
            and every image.
        shard_id, num_shards: this process's share: with shuffling every shard gets the same number
            of batches (DDP needs them in step); in evaluation shard k takes images k, k+num_shards, ...
        device: move batches there (None: leave them where they are).

    Same interface as :func:`gfnet.data.make_loader`'s loaders: ``len()``, ``set_epoch(epoch, start=0)``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, train: bool = True,
                 seed: int = 0, shard_id: int = 0, num_shards: int = 1, device=None):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"images and labels disagree on N: {images.shape[0]} vs {labels.shape[0]}")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} outside 0..{num_shards - 1}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.images, self.labels = images, labels
        self.batch_size, self.train, self.seed = int(batch_size), bool(train), int(seed)
        self.shard_id, self.num_shards = int(shard_id), int(num_shards)
        self.device = device
        self.epoch = 0
        self.start = 0
        if train and len(self) == 0:
            raise ValueError(f"{images.shape[0]} images make no full batch of {batch_size} on each of "
                             f"{num_shards} shard(s): lower the batch size")

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Reshuffle for ``epoch`` (call before iterating, as with DistributedSampler); iterating then yields
        the epoch's batches from number ``start`` on (a resumed run re-enters its epoch there)."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.epoch, self.start = int(epoch), int(start)

    def _indices(self) -> torch.Tensor:
        n = self.labels.shape[0]
        if not self.train:
            return torch.arange(self.shard_id, n, self.num_shards)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=g)
        per_shard = (n // self.num_shards) // self.batch_size * self.batch_size
        return order[self.shard_id::self.num_shards][:per_shard]

    def __len__(self) -> int:
        n = self._indices().numel()
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        return int(self._indices().numel())

    def __iter__(self):
        idx = self._indices()
        for start in range(self.start * self.batch_size, idx.numel(), self.batch_size):
            b = idx[start:start + self.batch_size].to(self.images.device)
            x, y = self.images[b], self.labels[b]
            if self.device is not None:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            yield x, y
