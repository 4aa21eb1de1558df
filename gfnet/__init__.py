"""gfnet: a high-performance engine for Glance-and-Focus Networks (GFNet, NeurIPS 2020 / T-PAMI 2023).

The package root is lazy: ``import gfnet`` (and so ``import gfnet.kernels`` or ``gfnet.ops``) loads nothing
until a name is used. Layers, each importing only the ones below it: cli -> applications (demo, deploy, evaluation,
train, viz) -> engine -> models -> ops -> kernels / gfnet._C (and the leaf modules config, precision, device,
_extension, atomic, which import no other part of gfnet but config).
"""
import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "BackboneConfig": "gfnet.config", "get_config": "gfnet.config",
    "GFNet": "gfnet.models", "GFNetState": "gfnet.models", "AnytimePrediction": "gfnet.models",
    "build_model": "gfnet.models",
    "load_checkpoint": "gfnet.checkpoint", "save_checkpoint": "gfnet.checkpoint",
    "budgeted_predict": "gfnet.engine", "BudgetedPrediction": "gfnet.engine",
    "export": "gfnet.deploy.exporter",
}

_SUBMODULES = {"atomic", "budget", "checkpoint", "config", "data", "demo", "deploy", "device", "engine", "evaluation",
               "flops",
               "kernels", "models", "ops", "precision", "train", "viz"}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"gfnet.{name}")
    raise AttributeError(f"module 'gfnet' has no attribute {name!r}")


def __dir__():
    return __all__
