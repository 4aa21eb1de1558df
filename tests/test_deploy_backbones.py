"""ONNX deployment packages of the reference backbones: they export (standard operators only), and a package's
early exit equals gfnet's engine image by image, for ResNet-50 (GRU classifier) and MobileNet-V3 (cascade), and
runs in a process where torch cannot be imported. The ExecuTorch packages: test_deploy_executorch.py.

By default one backbone of each family exports to ONNX (resnet50, densenet121, regnety_600m,
mobilenetv3_large_100, efficientnet_b2: their larger siblings are the same operators in more blocks); all
eleven with ``GFNET_TEST_ALL_BACKBONES=1``. On the 2-core machine the eleven ONNX exports took 29 minutes of
a 43-minute run (other jobs sharing the cores), too much for every CI run.
Each package is exported once per module (tests/deploy_packages.py) and shared.
"""
import os

import numpy as np
import pytest

import gfnet
from gfnet.config import REFERENCE_ARCHS
from gfnet.deploy import load, read_manifest

from deploy_packages import (
    EQUALITY,
    P,
    Packages,
    T,
    as_input,
    check_early_exit_equals_the_engine,
    compare_with_engine,
    random_pixels,
)
from helpers import TORCH_BLOCKER

pytest.importorskip("onnxruntime", reason="the deployment tests need gfnet[deploy]")
pytest.importorskip("onnxscript", reason="the deployment tests need gfnet[deploy]")

pytestmark = pytest.mark.usefixtures("native_cpu_convolutions")


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    return Packages(str(tmp_path_factory.mktemp("deploy-packages")))


def _onnx_op_domains(folder, manifest):
    import onnx

    domains, ops = set(), set()
    for graph in manifest["graphs"].values():
        model = onnx.load(os.path.join(folder, graph["file"]))
        assert not model.functions, f"{graph['file']} keeps local functions"
        for node in model.graph.node:
            domains.add(node.domain)
            ops.add(node.op_type)
    return domains, ops


#: One backbone per family, exported on every run; the others with GFNET_TEST_ALL_BACKBONES=1.
FAMILIES = ("resnet50", "densenet121", "regnety_600m", "mobilenetv3_large_100", "efficientnet_b2")
ALL_BACKBONES = os.environ.get("GFNET_TEST_ALL_BACKBONES") == "1"


@pytest.mark.parametrize("arch", sorted(REFERENCE_ARCHS))
def test_every_reference_backbone_exports_to_onnx(arch, packages):
    if arch not in FAMILIES and not ALL_BACKBONES:
        pytest.skip(f"{arch}: its family's export runs on every run; all eleven with GFNET_TEST_ALL_BACKBONES=1")
    net, folder, dtype = packages.get(arch, "onnx")
    manifest = read_manifest(folder)
    cfg = REFERENCE_ARCHS[arch]
    assert (manifest["arch"], manifest["image_size"], manifest["patch_size"], manifest["T"]) == \
        (arch, cfg.image_size, P, T)
    assert manifest["glance_mode"] == cfg.prime_interpolation and manifest["mean"] == list(cfg.mean)
    assert manifest["classifier"] == ("gru" if cfg.fc_rnn else "cascade")
    expected_graphs = {"glance", "focus"} | ({"classify"} if cfg.fc_rnn else {f"classify_{t}" for t in range(1, T)})
    assert set(manifest["graphs"]) == expected_graphs
    assert manifest["flops"] == pytest.approx(gfnet.flops.compute_flops(net)["flops"])
    assert len(manifest["dynamic_threshold"]) == 39
    domains, ops = _onnx_op_domains(folder, manifest)
    assert domains <= {"", "ai.onnx"}, domains  # standard operators only: no gfnet (or any custom) domain
    assert not any("gfnet" in op.lower() for op in ops)
    compare_with_engine(net, load(folder, threads=1), dtype)


@pytest.mark.parametrize("arch", [arch for arch, fmt in EQUALITY if fmt == "onnx"])
def test_package_early_exit_equals_the_engine(arch, packages):
    check_early_exit_equals_the_engine(arch, "onnx", packages)


def test_onnx_package_runs_without_torch(packages, tmp_path):
    import subprocess
    import sys

    net, folder, dtype = packages.get("mobilenetv3_large_100", "onnx")
    images = as_input(net, random_pixels(6, net.image_size, 5), dtype).numpy()
    np.save(tmp_path / "images.npy", images)
    thresholds = net.meta.dynamic_threshold[15].tolist()
    code = TORCH_BLOCKER + (
        "import json, numpy as np\n"
        "from gfnet.deploy import load\n"
        f"pkg = load({folder!r}, threads=1)\n"
        f"res = pkg.predict(np.load({str(tmp_path / 'images.npy')!r}), {thresholds!r}, batch_size=4)\n"
        "assert 'torch' not in sys.modules, [m for m in sys.modules if m.startswith('torch')]\n"
        "print(json.dumps({'preds': res.preds.tolist(), 'exit_step': res.exit_step.tolist(),\n"
        "                  'probs': res.probs.tolist()}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    res = load(folder, threads=1).predict(images, thresholds, batch_size=4)
    assert out["preds"] == res.preds.tolist() and out["exit_step"] == res.exit_step.tolist()
    assert np.array_equal(np.asarray(out["probs"], dtype=np.float32), res.probs)
