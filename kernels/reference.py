"""The plain-PyTorch references of gfnet's ops: the definitions the kernels are tested against, and what runs
on devices without a kernel. Triton-free, so that gfnet.ops imports them without loading Triton (the
Triton kernels of kernels/<op>.py are imported only when one runs, see gfnet.ops._dispatch)."""
import torch
import torch.nn.functional as F


def compute_dtype(images) -> torch.dtype:
    """float64 for float64 images, else float32 (what every kernel computes in); ``images``: a Tensor or its
    dtype."""
    dtype = images if isinstance(images, torch.dtype) else images.dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalise_ref(x: torch.Tensor, source_dtype: torch.dtype, mean, std) -> torch.Tensor:
    """x / 255 when the source was uint8, then (x - mean) / std per channel (in that order, as the kernels).

    Every division is by a tensor, never by a Python scalar: ATen on CUDA turns division by a scalar into a
    multiplication by its reciprocal (one ulp off x / 255 for about half the byte values), while division by a
    tensor is correctly rounded on every device, as the kernels' divisions are."""
    if source_dtype == torch.uint8:
        x = x / torch.tensor(255.0, dtype=x.dtype, device=x.device)
    if mean is not None:
        x = (x - torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)) \
            / torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x


def finish_ref(x: torch.Tensor, source_dtype: torch.dtype, out_dtype, channels_last: bool) -> torch.Tensor:
    """Cast to ``out_dtype`` (default: float32 for uint8 sources, else the source's) in the asked layout."""
    if out_dtype is None:
        out_dtype = source_dtype if source_dtype.is_floating_point else torch.float32
    out = x.to(out_dtype)
    return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def focus_corners(actions, image_size, patch_size):
    """GFNet's patch corner, the one definition every crop uses: ``floor(a * (S - P))`` computed in the
    actions' dtype, as the reference computes it, then int32 (a[:, 0] the row, a[:, 1] the column).

    actions: Tensor[N, 2] float in [0, 1]; image_size: S; patch_size: P. Returns Tensor[N, 2] int32 on the
    actions' device (no host synchronisation)."""
    return torch.floor(actions * (image_size - patch_size)).to(torch.int32)


def focus_crop_ref(images, actions, patch_size, mean=None, std=None, out_dtype=None, channels_last=False):
    """Plain-PyTorch focus crop: the definition the kernels are tested against.

    images: Tensor[N, 3, H, W] (any strides), uint8 or float. actions: Tensor[N, 2] in [0, 1], (row, column).
    The corner is ``floor(actions * (S - P))`` computed in the actions' dtype, exactly as the GFNet reference
    does it. Returns Tensor[N, 3, P, P] in ``out_dtype`` (default: float32 for uint8 input, else the input's).
    """
    n, _, h, w = images.shape
    p = patch_size
    corners = focus_corners(actions, h, p).long()
    idx = torch.arange(p, device=images.device)
    rows = (corners[:, 0:1] + idx).view(n, 1, p, 1)
    cols = (corners[:, 1:2] + idx).view(n, 1, 1, p)
    x = images[torch.arange(n, device=images.device).view(n, 1, 1, 1),
               torch.arange(3, device=images.device).view(1, 3, 1, 1), rows, cols]
    x = x.to(compute_dtype(images))
    x = normalise_ref(x, images.dtype, mean, std)
    return finish_ref(x, images.dtype, out_dtype, channels_last)


def focus_crop_bilinear_ref(images, centers, patch_size, scale=1.0, mean=None, std=None, out_dtype=None,
                            channels_last=False):
    """Plain-PyTorch bilinear crop through ``F.grid_sample``; differentiable in images (float) and centers.

    images: Tensor[N, 3, H, W] (any strides), uint8 or float, H, W >= 2. centers: Tensor[N, 2] (row, column)
    in [0, 1]. Computed in float64 for float64 images, else float32. Returns Tensor[N, 3, P, P] in
    ``out_dtype`` (default: float32 for uint8, else the input's). Convention: see the module docstring.
    """
    n, _, h, w = images.shape
    p = patch_size
    compute = compute_dtype(images)
    x = images.to(compute)
    x = normalise_ref(x, images.dtype, mean, std)
    c = centers.to(compute)
    steps = (torch.arange(p, dtype=compute, device=x.device) - (p - 1) * 0.5) * scale
    # grid_sample with align_corners=True maps -1 and 1 to the centers of the first and last pixels.
    gy = (c[:, 0:1] * (h - 1) + steps) * (2.0 / (h - 1)) - 1.0
    gx = (c[:, 1:2] * (w - 1) + steps) * (2.0 / (w - 1)) - 1.0
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return finish_ref(out, images.dtype, out_dtype, channels_last)


def glance_resize_ref(images, size, mode="bicubic", mean=None, std=None, out_dtype=None, channels_last=False):
    """Plain-PyTorch glance resize: ``F.interpolate(align_corners=True)`` then normalisation.

    images: Tensor[N, 3, H, W] (any strides), uint8 or float; computed in float32 (float64 for float64
    input). Returns Tensor[N, 3, size, size] in ``out_dtype`` (default: float32 for uint8, else the input's).
    """
    compute = compute_dtype(images)
    x = images.to(compute)
    x = F.interpolate(x, size=(size, size), mode=mode, align_corners=True)
    x = normalise_ref(x, images.dtype, mean, std)
    return finish_ref(x, images.dtype, out_dtype, channels_last)
