"""The training augmentation's random numbers, drawn on the host and shared by both backends.

The reference trains with torchvision's ``RandomResizedCrop`` and ``RandomHorizontalFlip``, which
draw from torch's global generator. gfnet draws the same distributions with the same algorithm
from a generator seeded per batch (:meth:`gfnet.data.sharding.ShardPlan.batch_seed`), so that

- the DALI and torchvision backends cut the same window from the same file (their training
  batches agree to resampling rounding, as their evaluation batches do);
- a batch's augmentation depends on (seed, epoch, shard, batch) only: not on which worker process
  or DALI pipeline made it, nor on what ran before, so a resumed run gets what an uninterrupted
  one got.
"""
from __future__ import annotations

import math

import numpy as np


def random_resized_crop(rng: np.random.Generator, width: int, height: int, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3), attempts: int = 10) -> tuple[int, int, int, int]:
    """A window of a ``width x height`` image as torchvision's ``RandomResizedCrop.get_params`` draws it.

    Up to `attempts` tries of an area share in `scale` and a log-uniform aspect ratio in `ratio`;
    the first window that fits is placed uniformly; if none fits, the largest centred window whose
    aspect ratio lies in `ratio`.

    Returns:
        (top, left, crop_height, crop_width) in pixels, inside the image.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def batch_augmentation(seed: int, sizes, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[np.ndarray, np.ndarray]:
    """Crop windows and flips of one training batch.

    Args:
        seed: the batch's seed.
        sizes: (width, height) of each image, in batch order.

    Returns:
        (windows, flips): ``int32[N, 4]`` rows (top, left, crop_height, crop_width) and ``bool[N]``
        (mirror horizontally); image k's numbers depend on the seed and on images 0..k only.
    """
    rng = np.random.default_rng(seed)
    windows = np.zeros((len(sizes), 4), dtype=np.int32)
    flips = np.zeros(len(sizes), dtype=bool)
    for k, (width, height) in enumerate(sizes):
        windows[k] = random_resized_crop(rng, width, height, scale, ratio)
        flips[k] = rng.random() < 0.5
    return windows, flips
