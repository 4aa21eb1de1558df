"""Small shared helpers for the tests."""
import torch


def randomise_batchnorm(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give batch-norm layers non-trivial running statistics and affine parameters.

    Freshly initialised networks have mean 0 / var 1 statistics, which makes many activations
    degenerate (saturated softmax, policies at 0.5); random statistics exercise real arithmetic.
    """
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            n = m.running_mean.numel()
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            if m.weight is not None:
                m.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return module
