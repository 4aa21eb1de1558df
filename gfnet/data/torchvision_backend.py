"""The torchvision backend of :func:`gfnet.data.make_loader`: PIL transforms in DataLoader workers.

The reference code's own pipeline (PIL decode, torchvision transforms, a DataLoader), fed the same
planned batches as the DALI backend (:mod:`gfnet.data.sharding`), so the two read the same files in
the same batches. A file that fails to decode in a worker comes back as a failure record instead of
an exception, so an epoch never stops on one bad image.

Training augmentations draw from a generator seeded per sample from (seed, epoch, file index), not from
the workers' own streams: the pixels of an epoch do not depend on which worker read a file, on how many
workers there are, nor on whether the run was interrupted and resumed (the workers' streams restart
then), so a resumed run sees exactly the images of an uninterrupted one.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from gfnet.data.loader import ImageLoader, TransformSpec
from gfnet.data.validate import describe_decode_error

_INTERP = {"nearest": T.InterpolationMode.NEAREST, "bilinear": T.InterpolationMode.BILINEAR,
           "bicubic": T.InterpolationMode.BICUBIC, "lanczos": T.InterpolationMode.LANCZOS}


def build_transform(spec: TransformSpec):
    """PIL image -> ``Tensor[3, S, S]`` float32 normalised, or ``Tensor[S, S, 3]`` uint8 (HWC)."""
    interp = _INTERP[spec.interpolation]
    if spec.train:
        geometry = [T.RandomResizedCrop(spec.image_size, scale=spec.scale, ratio=spec.ratio, interpolation=interp),
                    T.RandomHorizontalFlip()]
    else:
        geometry = [T.Resize(spec.resize_size, interpolation=interp), T.CenterCrop(spec.image_size)]
    if spec.output == "float":
        return T.Compose(geometry + [T.ToTensor(), T.Normalize(spec.mean, spec.std)])
    return T.Compose(geometry + [_hwc_uint8])


def _hwc_uint8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))


class _Files(Dataset):
    def __init__(self, files: list[str], labels: list[int], transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, item):
        # item: a file index, or (file index, augmentation seed) from _PlannedBatches in training
        i, seed = item if isinstance(item, tuple) else (item, None)
        path = self.files[i]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")  # grayscale, CMYK, palette/alpha PNG -> RGB
            if seed is None:
                return self.transform(img), self.labels[i], None
            # torchvision's random transforms draw from torch's global generator: seed it for this sample
            # only (fork_rng restores it afterwards: with num_workers=0 this is the training process's).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self.transform(img), self.labels[i], None
        except Exception as exc:  # a decoder error of any type must not stop the epoch
            return None, self.labels[i], (path, f"PIL cannot decode it: {describe_decode_error(exc, path)}")


def _collate(samples):
    ok = [s for s in samples if s[0] is not None]
    failures = [s[2] for s in samples if s[0] is None]
    if not ok:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), failures
    images = torch.stack([s[0] for s in ok])
    labels = torch.as_tensor([s[1] for s in ok], dtype=torch.int64)
    return images, labels, failures


class _PlannedBatches:
    """The DataLoader's batch sampler: the current epoch's planned batches, set before each epoch (lists of
    file indices, or of (file index, augmentation seed) pairs in training)."""

    def __init__(self):
        self.batches: list[list] = []

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
            dataset = _Files(self.index.files, self.index.labels, build_transform(self.spec))
            gen = torch.Generator().manual_seed(
                int(np.random.default_rng([self.seed, self.shard_id, 2]).integers(2**62)))
            workers = self.num_threads
            self._loader = DataLoader(dataset, batch_sampler=self._sampler, num_workers=workers,
                                      collate_fn=_collate, generator=gen, pin_memory=self.device.type == "cuda",
                                      persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None)
        return self._loader

    def _augmentation_seeds(self) -> np.ndarray:
        """int64[len(files)]: the augmentation seed of every file in the current epoch (a function of the
        loader's seed, the epoch and the file's index only)."""
        return np.random.default_rng([self.seed, self.epoch, 4]).integers(0, 2**63 - 1, size=len(self.index.files))

    def _iterate(self, batches):
        if not batches:
            return
        loader = self._dataloader()
        if self.spec.train:
            seeds = self._augmentation_seeds()
            self._sampler.batches = [[(i, int(seeds[i])) for i in b.tolist()] for b in batches]
        else:
            self._sampler.batches = [b.tolist() for b in batches]
        for images, labels, failures in loader:
            if len(labels) and self.spec.output == "uint8":
                images = images.permute(0, 3, 1, 2)  # NCHW view of NHWC memory: torch.channels_last
            if self.device.type == "cuda":
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
            yield images, labels, failures
