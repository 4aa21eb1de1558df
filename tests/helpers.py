"""Small shared helpers for the tests."""
import torch


def randomise_batchnorm(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give batch-norm layers non-trivial running statistics and affine parameters (the benchmarks' helper)."""
    from gfnet.bench.deploy_exports import _randomise_batchnorm

    return _randomise_batchnorm(module, seed, affine=True)


#: Python source for a subprocess: a meta-path finder that refuses ``torch`` (and every ``torch.*``), as a
#: machine without PyTorch would; prepend it to the code of ``python -c``.
TORCH_BLOCKER = (
    "import sys\n"
    "class _NoTorch:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'torch' or name.startswith('torch.'):\n"
    "            raise ModuleNotFoundError(f'No module named {name!r} (blocked: a machine without PyTorch)')\n"
    "        return None\n"
    "sys.meta_path.insert(0, _NoTorch())\n"
)


def module_blocker(*names: str) -> str:
    """Like :data:`TORCH_BLOCKER` for other top-level modules (a machine without ``names`` installed)."""
    return (
        "import sys\n"
        f"_BLOCKED = {tuple(names)!r}\n"
        "class _Blocked:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in _BLOCKED:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Blocked())\n"
    )
