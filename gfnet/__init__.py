"""gfnet: a high-performance engine for Glance-and-Focus Networks (GFNet, NeurIPS 2020 / T-PAMI 2023)."""
import torch as _torch  # noqa: F401  (gfnet._C links against torch's libraries: load them first)

from gfnet.config import BackboneConfig, get_config
from gfnet.models import AnytimePrediction, GFNet, GFNetState, build_model

__version__ = "0.1.0"

__all__ = ["AnytimePrediction", "BackboneConfig", "GFNet", "GFNetState", "build_model", "get_config",
           "load_checkpoint", "save_checkpoint", "__version__"]


def __getattr__(name):
    # checkpoint I/O imports lazily: `import gfnet` stays cheap for the CLI tools.
    if name in ("load_checkpoint", "save_checkpoint"):
        from gfnet import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'gfnet' has no attribute {name!r}")
