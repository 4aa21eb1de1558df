"""Every reference backbone through ``gfnet.export`` in every format: the record that they all export.

For each backbone of :data:`gfnet.config.REFERENCE_ARCHS` and each format ("onnx", "executorch"): a randomly
initialised GFNet (P=96; T=5, MobileNet-V3 T=3; 1000 classes; batch-norm statistics randomised so that the
outputs are not degenerate; classifier weights x8 so that confidences spread beyond the runtime tolerance) is
exported with ``verify=True`` (every graph run in its runtime against the
PyTorch modules), loaded with :func:`gfnet.deploy.load`, and its ``predict`` compared image by image with
:func:`gfnet.budgeted_predict` on the same uint8 images and thresholds (exit step and prediction equal for every
image not reported ambiguous; probabilities within the runtime tolerance). Recorded per export: wall-clock and
CPU seconds of the export, the package's size, the verification's largest difference, the comparison's outcome.

Run (minutes per backbone; ExecuTorch's lowering is the slow part):
``python -m gfnet.bench.deploy_exports --out-dir bench/results [--formats onnx executorch] [--archs ...]``.
It writes ``deploy_exports_cpu.json`` and ``.md`` atomically (the environment stamp of gfnet-bench). The test
suite exports one backbone per family to ONNX (all eleven with ``GFNET_TEST_ALL_BACKBONES=1``) and ResNet-50 and
MobileNet-V3 to ExecuTorch on every run; this file is the record of all eleven in both formats.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np
import torch

#: Images compared per backbone, and the budget: thresholds at these quantiles of the engine's confidences.
NUM_IMAGES = 8
PROB_ATOL = 1e-4


def _randomise_batchnorm(module: torch.nn.Module, seed: int = 0, affine: bool = False) -> torch.nn.Module:
    """Non-trivial batch-norm running statistics (and, with ``affine``, weights and biases): a freshly
    initialised network's mean 0 / var 1 make many activations degenerate; random ones exercise real arithmetic."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            n = m.running_mean.numel()
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            if affine and m.weight is not None:
                m.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return module


def check_backbone(arch: str, format: str, patch_size: int = 96, T: Optional[int] = None, num_classes: int = 1000,
                   seed: int = 0) -> dict:
    """Export one backbone to one format and compare its package with the engine; returns the record."""
    import gfnet
    from gfnet.deploy import load

    T = T or (3 if arch.startswith("mobilenet") else 5)
    torch.manual_seed(seed)
    net = gfnet.build_model(arch, patch_size=patch_size, T=T, num_classes=num_classes).eval()
    _randomise_batchnorm(net, seed)
    with torch.no_grad():  # sharper outputs than at initialisation (as the tests' nets): with 1000 classes the
        for module in (net.fc, net.model_prime.head):  # initial confidences lie within the runtime tolerance
            for p in module.parameters():  # of each other and every image would be reported ambiguous
                p.mul_(8.0)
    S = net.image_size
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (NUM_IMAGES, 3, S, S), dtype=torch.uint8, generator=g)
    ref = net.anytime_predict(images)
    conf = ref.probs.max(-1).values  # [T, N]
    thresholds = [float(conf[t].median()) for t in range(T - 1)] + [-1e8]
    engine = gfnet.budgeted_predict(net, images, thresholds, batch_size=4)
    folder = tempfile.mkdtemp(prefix=f"gfnet-export-{arch}-")
    out = os.path.join(folder, "pkg")
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        manifest = gfnet.export(net, out, format=format, input_dtype="uint8", max_batch=8)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        pkg = load(out, threads=1)
        res = pkg.predict(images.numpy(), thresholds, batch_size=4)
        clear = ~res.ambiguous
        exits_equal = bool(np.array_equal(res.exit_step[clear], engine.exit_step.numpy()[clear]))
        preds_equal = bool(np.array_equal(res.preds[clear], engine.preds.numpy()[clear]))
        engine_probs = ref.probs.numpy()[engine.exit_step.numpy(), np.arange(NUM_IMAGES)]
        prob_diff = float(np.abs(res.probs[clear] - engine_probs[clear]).max()) if clear.any() else 0.0
        return {"arch": arch, "format": format, "S": S, "P": patch_size, "T": T, "classes": num_classes,
                "graphs": sorted(manifest["graphs"]), "export_wall_s": round(wall, 1), "export_cpu_s": round(cpu, 1),
                "package_mb": round(size / 2**20, 1),
                "verify_max_abs_difference": max(manifest["verified"]["max_abs_difference"].values()),
                "images": NUM_IMAGES, "ambiguous": int(res.ambiguous.sum()), "exits_equal": exits_equal,
                "preds_equal": preds_equal, "probs_max_abs_difference": prob_diff,
                "ok": exits_equal and preds_equal and prob_diff <= PROB_ATOL}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _markdown(env: dict, records: Sequence[dict]) -> str:
    lines = ["# gfnet.export: every reference backbone in every format", "",
             f"Machine: {env['device_name']} ({env['cpus']} CPUs usable); torch {env['torch']}, Python "
             f"{env['python']}; git {env['git']}; load average {env['load_average']} at the start, "
             f"{env.get('load_average_end')} at the end (a load above the CPU count inflates wall-clock export "
             "times, CPU seconds less so)." + (f" {env['note']}." if env.get("note") else ""), "",
             "Each package: P=96, T=5 (MobileNet-V3: T=3), 1000 classes, uint8 input, max_batch 8; verified graph by "
             f"graph against PyTorch; predict() on {NUM_IMAGES} images compared with gfnet.budgeted_predict "
             "(thresholds at the median confidence of steps 1..T-1).", "",
             "| backbone | format | S | graphs | export wall | export CPU | package | verify max diff | ambiguous | "
             "exits, preds equal | probs max diff | ok |", "|" + "---|" * 12]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['format']} | | | | | | | | | | FAILED: {r['error']} |")
            continue
        lines.append(f"| {r['arch']} | {r['format']} | {r['S']} | {len(r['graphs'])} | {r['export_wall_s']} s | "
                     f"{r['export_cpu_s']} s | {r['package_mb']} MB | {r['verify_max_abs_difference']:.2g} | "
                     f"{r['ambiguous']}/{r['images']} | {r['exits_equal'] and r['preds_equal']} | "
                     f"{r['probs_max_abs_difference']:.2g} | {r['ok']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from gfnet.atomic import atomic_write_text
    from gfnet.bench.rows import environment
    from gfnet.config import REFERENCE_ARCHS

    p = argparse.ArgumentParser(prog="python -m gfnet.bench.deploy_exports", description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--formats", nargs="+", default=["onnx", "executorch"], choices=["onnx", "executorch"])
    p.add_argument("--archs", nargs="+", default=list(REFERENCE_ARCHS))
    p.add_argument("--note", default=None)
    args = p.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    torch.set_num_threads(1)
    env = environment("cpu", note=args.note)
    records = []
    stem = os.path.join(args.out_dir, "deploy_exports_cpu")
    for fmt in args.formats:
        for arch in args.archs:
            try:
                record = check_backbone(arch, fmt)
            except Exception as e:  # recorded, and the run goes on to the next backbone
                record = {"arch": arch, "format": fmt, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
            print(json.dumps(record), flush=True)
            records.append(record)
            torch._dynamo.reset()
            # rewritten after every backbone: a run stopped after an hour keeps what it measured
            env["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
            atomic_write_text(stem + ".json", json.dumps({"format": "gfnet-deploy-exports/1", "env": env,
                                                          "records": records}, indent=1) + "\n")
            atomic_write_text(stem + ".md", _markdown(env, records))
    print(f"wrote {stem}.json and {stem}.md")
    return 0 if all(r.get("ok") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
