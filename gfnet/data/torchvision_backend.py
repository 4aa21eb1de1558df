"""The torchvision backend of :func:`gfnet.data.make_loader`: PIL transforms in DataLoader workers.

The reference code's own pipeline (PIL decode, torchvision transforms, a DataLoader), fed the same
planned batches as the DALI backend (:mod:`gfnet.data.sharding`), so the two read the same files in
the same batches. Each planned batch is made whole by one worker: it reads and checks the files
(:func:`gfnet.data.validate.inspect_encoded`, as the DALI backend does), decodes them, replaces those
that fail in a training batch, and returns the failures as records instead of raising, so an epoch
never stops on one bad image. The training crops and flips come from the batch's own seed
(:mod:`gfnet.data.augment`), not from the worker's global generator, so a batch is the same
whichever worker makes it and whatever ran before: a run resumed in new worker processes reads
what an uninterrupted one reads.
"""
from __future__ import annotations

import functools
import io
import os
import signal
import threading

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as F

from gfnet.data.augment import batch_augmentation
from gfnet.data.loader import ImageLoader, TransformSpec
from gfnet.data.sharding import PlannedBatch, ShardPlan, fill_batch
from gfnet.data.validate import describe_decode_error, read_checked

_INTERP = {"nearest": T.InterpolationMode.NEAREST, "bilinear": T.InterpolationMode.BILINEAR,
           "bicubic": T.InterpolationMode.BICUBIC, "lanczos": T.InterpolationMode.LANCZOS}


def build_transform(spec: TransformSpec):
    """``f(img, window, flip)``: PIL image -> ``Tensor[3, S, S]`` float32 normalised, or ``Tensor[S, S, 3]``
    uint8 (HWC). Training crops ``window`` = (top, left, height, width) and resizes it to S x S, as
    torchvision's RandomResizedCrop does with the window it draws, then mirrors if ``flip``;
    evaluation resizes and centre-crops (window and flip ignored)."""
    interp = _INTERP[spec.interpolation]
    S = spec.image_size
    if spec.output == "float":
        finish = T.Compose([T.ToTensor(), T.Normalize(spec.mean, spec.std)])
    else:
        finish = _hwc_uint8
    if not spec.train:
        geometry = T.Compose([T.Resize(spec.resize_size, interpolation=interp), T.CenterCrop(S)])
        return lambda img, window=None, flip=False: finish(geometry(img))

    def train(img, window, flip):
        top, left, height, width = (int(v) for v in window)
        img = F.resized_crop(img, top, left, height, width, [S, S], interpolation=interp, antialias=True)
        return finish(F.hflip(img) if flip else img)

    return train


def _hwc_uint8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))


def _load(path: str):
    """(RGB PIL image, None), or (None, why the file is skipped)."""
    data, check = read_checked(path)
    if data is None:
        return None, check
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB"), None  # grayscale, CMYK, palette/alpha PNG -> RGB; no EXIF rotation
    except Exception as exc:  # a decoder error of any type must not stop the epoch
        return None, f"PIL cannot decode it: {describe_decode_error(exc, path)}"


class _Batches(Dataset):
    """Makes one planned batch per item: ``(images, labels, failures)``, failures (path, reason)."""

    def __init__(self, files: list[str], labels: list[int], spec: TransformSpec, plan: ShardPlan):
        self.files, self.labels, self.spec, self.plan = files, labels, spec, plan
        self.transform = build_transform(spec)

    def __getitem__(self, batch: PlannedBatch):
        loaded, failures = fill_batch(batch, lambda: self.plan.spares(batch.epoch, batch.position),
                                      lambda i: _load(self.files[i]))
        failures = [(self.files[i], reason) for i, reason in failures]
        if not loaded:
            return torch.empty(0), torch.empty(0, dtype=torch.int64), failures
        if self.spec.train:
            windows, flips = batch_augmentation(batch.seed, [img.size for _, img in loaded], self.spec.scale,
                                                self.spec.ratio)
        else:
            windows, flips = [None] * len(loaded), [False] * len(loaded)
        images = torch.stack([self.transform(img, w, f) for (_, img), w, f in zip(loaded, windows, flips)])
        labels = torch.as_tensor([self.labels[i] for i, _ in loaded], dtype=torch.int64)
        return images, labels, failures


def _as_is(item):
    return item


#: Signals that schedulers stop jobs with, delivered to every process of the job (SLURM) or of a worker's
#: process group (torchrun's agent).
_STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2") if hasattr(signal, n))


def _caught_stop_signals() -> tuple:
    """The stop signals this process catches with a Python handler."""
    return tuple(int(s) for s in _STOP_SIGNALS if callable(signal.getsignal(s)))


def _leave_stop_signals_to_parent(caught: tuple, worker_id: int) -> None:
    """A DataLoader worker's start: leave the stop signals that the training process catches to it.

    A training process that catches SIGTERM (gfnet.train.preemption) finishes its step and saves; its
    workers, which the same SIGTERM reaches (SLURM signals every process of a job, torchrun's agent a
    worker's whole process group), would die of it (torch's worker handler re-raises it) and make the
    training process fail with "DataLoader worker ... killed" in the middle of its save. So the worker
    blocks those signals and a thread takes them: one its parent sent (multiprocessing ends its workers so
    at exit) ends the worker at once, as torch's own handler does; any other is left to the parent, which
    ends its workers itself (a worker also notices its parent's death). The signals are those the parent
    caught when it made the DataLoader (``caught``) and those whose Python handlers a forked worker
    inherited.
    """
    signals = set(caught) | set(_caught_stop_signals())
    if not signals:
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)

    def take():
        while True:
            if signal.sigwaitinfo(signals).si_pid == parent:
                os._exit(0)

    threading.Thread(target=take, name="gfnet-worker-signals", daemon=True).start()


class _PlannedBatches:
    """The DataLoader's sampler: the current epoch's planned batches, set before each epoch."""

    def __init__(self):
        self.batches: list[PlannedBatch] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class TorchvisionLoader(ImageLoader):
    """:class:`gfnet.data.loader.ImageLoader` over a torch DataLoader (see the module docstring).

    The DataLoader and its worker processes are made on the first epoch and kept (persistent
    workers), as a training loop would, so later epochs pay no start-up.
    """

    backend = "torchvision"

    def _dataloader(self) -> DataLoader:
        # Made again if `index` was replaced (e.g. restricted to a subset of its files) since the last epoch.
        if getattr(self, "_loader", None) is None or self._loader.dataset.files is not self.index.files:
            self._sampler = _PlannedBatches()
            dataset = _Batches(self.index.files, self.index.labels, self.spec, self.shard_plan())
            workers = self.num_threads
            # The loader's own generator: making its iterator draws a seed, which must not come from torch's
            # global stream (a resumed run makes its iterator at another epoch than an uninterrupted one, and
            # the training's random draws would part ways); the batches themselves need no worker randomness.
            gen = torch.Generator().manual_seed(
                int(np.random.default_rng([self.seed, self.shard_id, 2]).integers(2**62)))
            self._loader = DataLoader(dataset, batch_size=None, sampler=self._sampler, num_workers=workers,
                                      collate_fn=_as_is, generator=gen, pin_memory=self.device.type == "cuda",
                                      worker_init_fn=functools.partial(_leave_stop_signals_to_parent,
                                                                       _caught_stop_signals()),
                                      persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None)
        return self._loader

    def _iterate(self, batches):
        if not batches:
            return
        loader = self._dataloader()
        self._sampler.batches = batches
        for images, labels, failures in loader:
            if len(labels) and self.spec.output == "uint8":
                images = images.permute(0, 3, 1, 2)  # NCHW view of NHWC memory: torch.channels_last
            if self.device.type == "cuda":
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
            yield images, labels, failures
