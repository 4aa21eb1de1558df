"""Public glance/focus operators (temporary plain-PyTorch version; the kernels land in issue 3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _normalise(x, mean, std):
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    if mean is not None:
        m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        x = (x - m) / s
    return x


def glance_resize(images, size, mode="bicubic", mean=None, std=None, out_dtype=None,
                  channels_last=False, backend=None):
    x = _normalise(images, mean, std)
    out = F.interpolate(x, size=(size, size), mode=mode, align_corners=True)
    return out.to(out_dtype) if out_dtype is not None else out


def focus_crop(images, actions, patch_size, mean=None, std=None, out_dtype=None,
               channels_last=False, backend=None):
    S = images.shape[-1]
    corner = torch.floor(actions * (S - patch_size)).long()
    idx = torch.arange(patch_size, device=images.device)
    rows = (corner[:, 0:1] + idx).view(-1, 1, patch_size, 1)
    cols = (corner[:, 1:2] + idx).view(-1, 1, 1, patch_size)
    n = torch.arange(images.shape[0], device=images.device).view(-1, 1, 1, 1)
    c = torch.arange(images.shape[1], device=images.device).view(1, -1, 1, 1)
    out = _normalise(images[n, c, rows, cols], mean, std)
    return out.to(out_dtype) if out_dtype is not None else out
