"""The pieces the plain-PyTorch references of gfnet.kernels share: compute dtype, normalisation, output."""
import torch


def compute_dtype(images: torch.Tensor) -> torch.dtype:
    """float64 for float64 images, else float32 (what every kernel computes in)."""
    return torch.float64 if images.dtype == torch.float64 else torch.float32


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
