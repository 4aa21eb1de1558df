"""Deploy a GFNet: export its steps as graphs of standard operators, and run budgeted early exit outside
PyTorch (../shared/DESIGN.md, "Deployment").

- :func:`export` (:mod:`gfnet.deploy.exporter`, needs torch and the exporters): a package folder with the glance,
  focus and classifier graphs as ONNX models or ExecuTorch programs, and ``manifest.json``
  (:mod:`gfnet.deploy.manifest`: S, P, T, normalisation, Multiply-Adds per step, budget thresholds, versions,
  checksums);
- :func:`load` (:mod:`gfnet.deploy.runtime`): a :class:`Package` whose ``predict(images, thresholds)`` runs
  early exit in ONNX Runtime (numpy and onnxruntime only: no torch) or ExecuTorch;
- :mod:`gfnet.deploy.latency`: batch-1 latency of a GFNet per budget in a chosen runtime (PyTorch eager or
  compiled, ONNX Runtime, ExecuTorch) and the accuracy-against-latency points of the paper's figure.

Importing this package imports nothing but the module asked for: ``gfnet.deploy.load`` stays torch-free.
"""
import importlib

_EXPORTS = {
    "export": "gfnet.deploy.exporter", "FORMATS": "gfnet.deploy.exporter", "INPUT_DTYPES": "gfnet.deploy.exporter",
    "load": "gfnet.deploy.runtime", "Package": "gfnet.deploy.runtime", "DeployPrediction": "gfnet.deploy.runtime",
    "AnytimeOutput": "gfnet.deploy.runtime", "DEFAULT_TOLERANCE": "gfnet.deploy.runtime",
    "PackageError": "gfnet.deploy.manifest", "read_manifest": "gfnet.deploy.manifest",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gfnet.deploy' has no attribute {name!r}")


def __dir__():
    return __all__
