"""Export a GFNet as a deployment package: its step graphs (:mod:`gfnet.deploy.graphs`) as ONNX models or
ExecuTorch programs, and a manifest (:mod:`gfnet.deploy.manifest`).

``gfnet.export(net, "pkg/", format="onnx")`` (or ``gfnet-export --checkpoint F --format onnx --out pkg/``):

1. the graphs are traced once with ``torch.export`` at a batch of 2 with a dynamic batch dimension (1 up to
   ``max_batch``; ExecuTorch plans its memory for ``max_batch``, read back from the lowered program and
   checked; ONNX leaves the dimension unbounded), and checked to hold no gfnet custom op;
2. ONNX: ``torch.onnx.export`` (the dynamo exporter, onnxscript's optimiser), one ``.onnx`` per graph with its
   weights inside; ExecuTorch: ``to_edge_transform_and_lower`` with the XNNPACK partitioner (convolutions,
   matrix products and most pointwise operations run in XNNPACK, the gathers of the resize and crop in
   ExecuTorch's portable kernels), one ``.pte`` per graph;
3. with ``verify`` (default) every written graph is run in its runtime on 3 images and on 1 (the trace saw 2:
   a dimension specialised to the traced batch fails here) and compared with the PyTorch modules
   (:data:`VERIFY_ATOL`), before the package is published;
4. the package is written into a temporary folder beside ``out_dir`` (``.NAME.HOST-PID.XXXX.gfnet-tmp``, files
   fsynced) and renamed into place at the end: a killed export leaves no half package under ``out_dir``; the
   next export into that folder removes the temporary folders of killed ones (only gfnet's, of processes gone).
"""
from __future__ import annotations

import copy
import datetime
import json
import logging
import os
import platform
import shutil
import tempfile
import warnings
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from gfnet.deploy.graphs import step_graphs
from gfnet.deploy.manifest import EXTENSIONS, FORMAT, MANIFEST, sha256_file

__all__ = ["export", "FORMATS", "INPUT_DTYPES", "INSTALL_HINT", "VERIFY_ATOL", "missing_dependencies",
           "check_no_custom_ops"]

log = logging.getLogger("gfnet.deploy")

FORMATS = tuple(EXTENSIONS)
INPUT_DTYPES = ("uint8", "float32")
#: What to install for the export and the runtimes (one line in every refusal).
INSTALL_HINT = "pip install 'gfnet[deploy]' (onnx, onnxruntime, onnxscript, executorch)"
#: The written graphs against the PyTorch modules on the example batch: the runtimes' convolution and matrix
#: kernels sum in other orders than PyTorch's (measured differences ~1e-7 on probabilities and 1e-6 on
#: features; XNNPACK's on ResNet-50's feature maps up to 6e-4 where their values reach tens); a translation
#: error is orders of magnitude larger. Probabilities (outputs named ``probs``) are compared element by element
#: (atol + rtol * |expected|); the states and features against their scale (atol + rtol * max |expected|).
VERIFY_ATOL, VERIFY_RTOL = 1e-4, 1e-3
_NEEDS = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "executorch": ("executorch",)}
_TEMP_SUFFIX = ".gfnet-tmp"

#: Input and output names of each graph (the manifest repeats them; ONNX wants every name once per graph).
SIGNATURES = {
    "glance": (["images"], ["probs", "fc_state", "policy_hidden", "feature_map"]),
    "focus": (["images", "feature_map", "policy_hidden"], ["pooled", "next_feature_map", "next_policy_hidden",
                                                            "action"]),
    "classify": (["pooled", "fc_state"], ["probs", "next_fc_state"]),
}


def missing_dependencies(format: str) -> list:
    """The packages the export to ``format`` needs that are not installed."""
    import importlib.util

    def installed(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken installation counts as missing
            return False

    return [name for name in _NEEDS[format] if not installed(name)]


def _signature(name: str):
    return SIGNATURES["classify" if name.startswith("classify") else name]


def check_no_custom_ops(exported, where: str) -> None:
    """Refuse a traced graph that calls a gfnet custom op (a runtime would need gfnet to run it)."""
    custom = sorted({str(node.target) for node in exported.graph.nodes
                     if node.op == "call_function" and str(node.target).startswith("gfnet.")})
    if custom:
        raise RuntimeError(f"{where}: the traced graph calls gfnet's custom ops {custom}; a deployed graph must "
                           "hold standard operators only")


def _plain_copy(net):
    """A CPU float32 eval copy of ``net`` whose modules run eagerly (a compiled model's torch.compile
    wrappers dropped: torch.export traces the modules themselves)."""
    clone = copy.deepcopy(net).to("cpu", torch.float32).eval()
    for module in clone.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    clone.model_prime.to(memory_format=torch.contiguous_format)
    clone.model.to(memory_format=torch.contiguous_format)
    return clone


def _examples(net, graphs: Mapping[str, torch.nn.Module], uint8: bool, batch: int, seed: int) -> dict:
    """Example inputs of every graph at ``batch`` images (the states from running the graphs eagerly)."""
    S = net.image_size
    g = torch.Generator().manual_seed(seed)
    if uint8:
        images = torch.randint(0, 256, (batch, 3, S, S), dtype=torch.uint8, generator=g)
    else:
        images = torch.randn(batch, 3, S, S, generator=g)
    out = {"glance": (images,)}
    with torch.no_grad():
        _, fc_state, policy_hidden, fmap = graphs["glance"](images)
        if "focus" in graphs:
            out["focus"] = (images, fmap, policy_hidden)
            pooled = graphs["focus"](images, fmap, policy_hidden)[0]
            for name in graphs:
                if name.startswith("classify"):
                    out[name] = (pooled, fc_state)
    return out


def _trace(module, args, max_batch: int):
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(module, args, dynamic_shapes=tuple({0: batch} for _ in args), strict=False)


def _write_onnx(exported, name: str, path: str) -> None:
    import onnx_ir as ir

    inputs, outputs = _signature(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(exported, (), dynamo=True, input_names=inputs, output_names=outputs,
                                    optimize=True, verbose=False)
    # the batch dimension is called N in every graph (the exporter names it after a symbol)
    for value in list(program.model.graph.inputs) + list(program.model.graph.outputs):
        if value.shape is not None and len(value.shape) and not isinstance(value.shape[0], int):
            dims = list(value.shape)
            dims[0] = ir.SymbolicDim("N")
            value.shape = ir.Shape(dims)
    program.save(path, external_data=False)


def _user_inputs(exported_program) -> list:
    """The placeholder nodes of a program's own inputs (not its lifted weights and constants)."""
    names = set(exported_program.graph_signature.user_inputs)
    return [node for node in exported_program.graph.nodes if node.op == "placeholder" and node.name in names]


def _restore_batch_bound(exported_program, max_batch: int) -> None:
    """Give the batch symbol of every input its traced upper bound back.

    XNNPACK's lowering re-runs each convolution's fake kernel, whose CPU backend choice asks "batch >= 16?"
    of a depthwise convolution (a speed heuristic of PyTorch's own kernels, meaningless to XNNPACK); the
    answer is not kept as a guard, but it narrows the symbol's range to at most 15 in the shape environment,
    and ExecuTorch plans its memory from that range: a MobileNet-V3 package exported for 16 images refused 16
    at run time (``set_inputs`` error 0x10, ExecuTorch 1.5.1, torch 2.14.1). The delegate resizes its
    tensors at run time; only the plan needs the bound."""
    from torch.utils._sympy.value_ranges import ValueRanges

    for node in _user_inputs(exported_program):
        val = node.meta.get("val")
        dim = val.shape[0] if isinstance(val, torch.Tensor) and val.dim() else None
        if not isinstance(dim, torch.SymInt):
            continue
        env, symbol = dim.node.shape_env, dim.node.expr
        current = env.var_to_range.get(symbol)
        if current is not None and current.upper < max_batch:
            env.var_to_range[symbol] = ValueRanges(current.lower, max_batch)


def planned_batch(program) -> int:
    """The largest batch an ExecuTorch program's memory plan holds: the smallest leading dimension among its
    inputs' planned (upper-bound) shapes."""
    sizes = [int(node.meta["spec"].shape[0]) for node in _user_inputs(program.exported_program())
             if len(node.meta["spec"].shape)]
    if not sizes:
        raise RuntimeError("the lowered ExecuTorch program has no batched input to read its plan from")
    return min(sizes)


def _write_executorch(exported, name: str, max_batch: int, path: str) -> None:
    """Lower ``exported`` (batch bounded at ``max_batch``) to an ExecuTorch program (XNNPACK delegate) whose
    memory plan holds ``max_batch`` images (read back and checked), and write it."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
        _restore_batch_bound(edge.exported_program(), max_batch)
        # remove_view_copy=False: ExecuTorch's view pass refuses a static-shape view of a dynamic-batch tensor
        # (the crop's index arithmetic has some); the copies it keeps are a few kilobytes per image
        program = edge.to_executorch(ExecutorchBackendConfig(remove_view_copy=False))
    planned = planned_batch(program)
    if planned < max_batch:
        raise RuntimeError(f"ExecuTorch planned the {name} graph for {planned} images, fewer than max_batch="
                           f"{max_batch}: export with max_batch={planned} or less, or use format='onnx' (any "
                           "batch)")
    with open(path, "wb") as fh:
        fh.write(program.buffer)


def _versions(format: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import gfnet

    out = {"gfnet": gfnet.__version__, "torch": torch.__version__, "python": platform.python_version(),
           "numpy": np.__version__}
    for name in ("onnx", "onnxscript", "onnxruntime") if format == "onnx" else ("executorch",):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _remove_stale(parent: str) -> None:
    """Temporary package folders of killed exports in ``parent`` (gfnet's names, this host, processes gone)."""
    from gfnet.atomic import _TEMP_RE, _host_tag, _process_alive

    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        m = _TEMP_RE.match(name)
        path = os.path.join(parent, name)
        if m and os.path.isdir(path) and m.group("host") == _host_tag() and not _process_alive(int(m.group("pid"))):
            shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(folder: str) -> None:
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain(value):
    """JSON form of a checkpoint field (tensors and numpy arrays as lists), or None."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double().tolist()
    if isinstance(value, np.ndarray):
        return value.astype(np.float64).tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return None


def _verify(format: str, folder: str, names: Sequence[str], files: Mapping[str, str], graphs, examples) -> dict:
    """Run each written graph in its runtime on the example batch (3 images; the trace saw 2) and on its first
    image; compare with the PyTorch modules. Returns name -> the largest absolute difference."""
    from gfnet.deploy.runtime import open_graphs

    runner = open_graphs(format, {name: os.path.join(folder, files[name]) for name in names}, threads=None)
    worst = {}
    for name in names:
        for args in (examples[name], tuple(a[:1] for a in examples[name])):
            with torch.no_grad():
                expected = [e.numpy() for e in graphs[name](*args)]
            got = runner.run(name, [a.numpy() for a in args])
            diff = 0.0
            for out_name, e, o in zip(_signature(name)[1], expected, got):
                scale = float(np.abs(e).max()) if e.size and out_name != "probs" else 0.0
                if e.shape != o.shape or not np.allclose(o, e, atol=VERIFY_ATOL + VERIFY_RTOL * scale,
                                                         rtol=VERIFY_RTOL):
                    detail = (f"shape {o.shape} against {e.shape}" if e.shape != o.shape else
                              f"largest difference {float(np.abs(o.astype(np.float64) - e).max()):.3g}"
                              + (f" (largest value {scale:.3g})" if scale else ""))
                    raise RuntimeError(f"the exported {name} graph ({format}) differs from the PyTorch model in "
                                       f"{out_name}: {detail} beyond atol={VERIFY_ATOL:g}, rtol={VERIFY_RTOL:g}"
                                       + (" of the largest value" if scale else ""))
                diff = max(diff, float(np.abs(o.astype(np.float64) - e).max()) if e.size else 0.0)
            worst[name] = max(worst.get(name, 0.0), diff)
    return worst


def export(net, out_dir, format: str = "onnx", input_dtype: str = "uint8", max_batch: int = 64,
           overwrite: bool = False, verify: bool = True, classes: Optional[Sequence[str]] = None,
           source: Optional[Mapping[str, Any]] = None, seed: int = 0) -> dict:
    """Write ``net`` as a deployment package into the folder ``out_dir``.

    Args:
        net: a :class:`gfnet.GFNet` (any device, eval or not: a CPU float32 eval copy is exported). Its ``meta``
            gives the budget fields (``flops``, ``dynamic_threshold``, ``budgeted_batch_classification``,
            ``anytime_classification``, ``classes``) where a checkpoint stored them.
        out_dir: the package folder; must not exist unless ``overwrite``.
        format: "onnx" (``.onnx`` files for ONNX Runtime) or "executorch" (``.pte`` programs, XNNPACK delegate).
        input_dtype: "uint8" (raw pixels [N, 3, S, S] in 0..255, divided by 255 and normalised inside the
            graphs) or "float32" (images already normalised with the backbone's mean/std, as gfnet's models take).
        max_batch: the largest batch a graph takes (ExecuTorch plans its memory for it; ONNX graphs take any
            batch and record None). The runtime splits larger batches.
        overwrite: replace an existing package at ``out_dir`` (the old one stays until the new one is complete).
        verify: run every written graph in its runtime against the PyTorch modules before publishing.
        classes: class names (default ``net.meta.classes``; None: unnamed).
        source: provenance to record (e.g. the checkpoint's path and sha256).
    Returns:
        the manifest (a dict, as written to ``out_dir/manifest.json``).
    Raises:
        ValueError: a bad argument, or ``out_dir`` exists (without ``overwrite``) or is a file.
        ImportError: the export's packages are missing (the message says what to install).
        RuntimeError: a graph holds a gfnet custom op or its runtime's output differs from PyTorch's.
    """
    from gfnet.engine import step_flops
    from gfnet.models import GFNet

    if not isinstance(net, GFNet):
        raise ValueError(f"export takes a gfnet.GFNet, got {type(net).__name__}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {format!r}")
    if input_dtype not in INPUT_DTYPES:
        raise ValueError(f"input_dtype must be one of {', '.join(INPUT_DTYPES)}; got {input_dtype!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 2:
        raise ValueError(f"max_batch must be an int >= 2 (the graphs are traced at a batch of 2); got {max_batch!r}")
    missing = missing_dependencies(format)
    if missing:
        raise ImportError(f"exporting to {format} needs {', '.join(missing)}: {INSTALL_HINT}")
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir} is a file; give a folder for the package")
    if os.path.exists(out_dir) and not overwrite:
        raise ValueError(f"{out_dir} exists; choose another folder or overwrite it (overwrite=True, --overwrite)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    _remove_stale(parent)

    model = _plain_copy(net)
    uint8 = input_dtype == "uint8"
    graphs = step_graphs(model, uint8)
    # traced at 2 images, verified at 3 and 1: a batch size the trace never saw catches a specialised dimension
    examples = _examples(model, graphs, uint8, min(3, max_batch), seed)
    traced = {name: tuple(a[:2] for a in args) for name, args in examples.items()}
    flops = step_flops(model)
    meta = net.meta  # gfnet.models.meta.ModelMeta: what the checkpoint stored besides the weights
    from gfnet.atomic import _host_tag

    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)[:100]}.{_host_tag()}-{os.getpid()}.",
                           suffix=_TEMP_SUFFIX, dir=parent)
    try:
        files = {}
        for name, module in graphs.items():
            exported = _trace(module, traced[name], max_batch)
            check_no_custom_ops(exported, f"the {name} graph")
            files[name] = name + EXTENSIONS[format]
            path = os.path.join(tmp, files[name])
            log.info("exporting the %s graph to %s", name, path)
            if format == "onnx":
                _write_onnx(exported, name, path)
            else:
                _write_executorch(exported, name, max_batch, path)
        differences = _verify(format, tmp, list(graphs), files, graphs, examples) if verify else None
        cfg = model.config
        steps = [None] + [("classify" if model.fc.is_rnn else f"classify_{t}") for t in range(1, model.T)]
        with torch.no_grad():
            glance_out = graphs["glance"](examples["glance"][0][:1])
        state_shapes = {key: list(value.shape[1:]) for key, value in
                        zip(("fc_state", "policy_hidden", "feature_map"), glance_out[1:])}
        manifest = {
            "format": FORMAT, "runtime": format, "arch": model.arch, "image_size": model.image_size,
            "patch_size": model.patch_size, "T": model.T, "num_classes": model.num_classes,
            "classes": [str(c) for c in (classes if classes is not None else meta.classes or [])] or None,
            "classifier": "gru" if model.fc.is_rnn else "cascade", "glance_mode": model.glance_mode,
            "interpolation": {"glance": model.glance_mode, "dataset": cfg.dataset_interpolation,
                              "crop_pct": cfg.crop_pct},
            "mean": list(cfg.mean), "std": list(cfg.std),
            "input": {"dtype": input_dtype, "layout": "NCHW", "shape": ["N", 3, model.image_size, model.image_size],
                      "normalised": not uint8},
            "max_batch": max_batch if format == "executorch" else None,
            "graphs": {name: {"file": files[name], "inputs": _signature(name)[0], "outputs": _signature(name)[1]}
                       for name in graphs},
            "steps": steps, "state_shapes": state_shapes,
            "flops": [float(f) for f in flops],
            "dynamic_threshold": _plain(meta.dynamic_threshold),
            "budgeted_batch_classification": _plain(meta.budgeted_batch_classification),
            "anytime_classification": _plain(meta.anytime_classification),
            "trained_policy": meta.trained_policy,
            "verified": {"atol": VERIFY_ATOL, "rtol": VERIFY_RTOL, "max_abs_difference": differences}
            if verify else None,
            "versions": _versions(format),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": dict(source) if source else None,
            "files": {files[name]: sha256_file(os.path.join(tmp, files[name])) for name in graphs},
        }
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1)
            fh.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a package is an ordinary folder
        _fsync_tree(tmp)
        if os.path.exists(out_dir):  # overwrite: the old package stays complete until the new one replaces it
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)[:100]}.{_host_tag()}-{os.getpid()}.",
                                   suffix=_TEMP_SUFFIX, dir=parent)
            os.rename(out_dir, os.path.join(old, "old"))
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
