"""The import graph of gfnet runs downward only, with no circles (issue 13):

    cli -> bench -> applications (demo, deploy, evaluation, train, viz) -> engine, checkpoint -> models
    -> ops, data, budget, flops -> kernels, gfnet._C and the leaf modules (config, precision, device, _extension,
    atomic)

Checked on the source: every import statement of every module (lazy ones inside functions included), with
``from gfnet import name`` resolved through the package root's table of lazy exports.
"""
import ast
import os
import subprocess
import sys
from collections import defaultdict

import gfnet

from helpers import TORCH_BLOCKER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = {"gfnet": "gfnet", "gfnet.kernels": "kernels", "gfnet.bench": "bench"}

LAYERS = {
    0: {"gfnet", "gfnet._C", "gfnet.kernels", "gfnet._extension", "gfnet.config", "gfnet.precision", "gfnet.device",
        "gfnet.atomic"},
    1: {"gfnet.ops", "gfnet.data", "gfnet.budget", "gfnet.flops"},
    2: {"gfnet.models"},
    3: {"gfnet.engine", "gfnet.checkpoint"},
    4: {"gfnet.train", "gfnet.evaluation", "gfnet.demo", "gfnet.viz", "gfnet.deploy"},
    5: {"gfnet.bench"},
    6: {"gfnet.cli"},
}
RANK = {unit: rank for rank, units in LAYERS.items() for unit in units}


def unit(module: str) -> str:
    """The layering unit of a module: gfnet.<first part> (or the root)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def resolve(module: str, name: str) -> str:
    if module == "gfnet":
        if name in gfnet._EXPORTS:
            return gfnet._EXPORTS[name]
        return f"gfnet.{name}" if name in gfnet._SUBMODULES or name == "_C" else "gfnet"
    return module


def import_graph():
    edges = defaultdict(set)
    for package, folder in SOURCES.items():
        for base, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(base, name)
                rel = os.path.relpath(path, os.path.join(ROOT, folder))[:-3].replace(os.sep, ".")
                module = package if rel == "__init__" else f"{package}.{rel}".replace(".__init__", "")
                with open(path) as fh:
                    tree = ast.parse(fh.read(), path)
                for node in ast.walk(tree):
                    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                            node.module.split(".")[0] == "gfnet":
                        for alias in node.names:
                            edges[module].add(resolve(node.module, alias.name))
                    elif isinstance(node, ast.Import):
                        edges[module].update(a.name for a in node.names if a.name.split(".")[0] == "gfnet")
    return edges


def test_every_unit_has_a_layer():
    units = {unit(m) for m in import_graph()} | {unit(t) for ts in import_graph().values() for t in ts}
    assert units <= set(RANK), sorted(units - set(RANK))


def test_imports_run_downward_only():
    upward = []
    for module, targets in import_graph().items():
        for target in targets:
            if unit(target) != unit(module) and RANK[unit(target)] > RANK[unit(module)]:
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_no_circles_between_units():
    graph = defaultdict(set)
    for module, targets in import_graph().items():
        graph[unit(module)].update(unit(t) for t in targets if unit(t) != unit(module))
    state, cycle = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycle.append(path + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in list(graph):
        if node not in state:
            visit(node, [node])
    assert not cycle, cycle


def test_importing_the_kernels_loads_no_model():
    code = ("import sys, time; t = time.perf_counter(); import gfnet.kernels, gfnet.kernels.focus_crop; "
            "print(time.perf_counter() - t); "
            "assert not [m for m in sys.modules if m.startswith(('gfnet.models', 'gfnet.ops', 'gfnet.engine'))]")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_importing_the_ops_leaves_triton_unloaded_until_a_triton_kernel_runs():
    """``import gfnet.ops`` (and the models and engine above it) loads no Triton, and gfnet's Triton kernels
    are defined only when one first runs, so TRITON_INTERPRET set after those imports (and after a C++ kernel
    ran, whose first call makes torch's custom-op machinery import Triton for its own use) still takes
    effect: the Triton kernel then runs in the interpreter."""
    code = ("import os, sys, torch, gfnet.ops, gfnet.models, gfnet.engine\n"
            "assert 'triton' not in sys.modules, sorted(m for m in sys.modules if 'kernels' in m)\n"
            "x = torch.rand(2, 3, 16, 16); a = torch.rand(2, 2)\n"
            "cpp = gfnet.ops.focus_crop(x, a, 8)\n"
            "assert 'gfnet.kernels.focus_crop' not in sys.modules, 'the C++ kernel defined the Triton kernels'\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "tri = gfnet.ops.focus_crop(x, a, 8, backend='triton')\n"
            "assert 'triton' in sys.modules and torch.equal(tri, cpp)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_deploy_runtime_imports_no_torch():
    # gfnet.deploy sits with the applications (its exporter uses the models and the engine), but its runtime
    # (load, Package.predict) and the manifest must import neither torch nor any module that does: an ONNX package
    # runs where only numpy and onnxruntime are installed (tests/test_deploy.py runs one there).
    code = TORCH_BLOCKER + (
        "import gfnet, gfnet.deploy\n"
        "from gfnet.deploy import load, read_manifest, PackageError, Package, DeployPrediction\n"
        "import gfnet.deploy.runtime, gfnet.deploy.manifest\n"
        "assert 'torch' not in sys.modules\n"
        "try:\n"
        "    import torch\n"
        "except ModuleNotFoundError:\n"
        "    print('blocked')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "blocked"  # the blocker works: a module that imported torch would have failed
