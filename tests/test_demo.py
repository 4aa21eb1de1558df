"""The demo's task, its --quick run end to end, its claims against recomputed numbers, and the
demo -> ``gfnet-viz report`` contract on the demo's real output folder."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import gfnet
from gfnet import budget
from gfnet.demo import QUICK, digit_patch_actions, make_cluttered_digits
from gfnet.viz import report
from gfnet.viz.report import BUDGET_CURVE_FILE, CHECKPOINT_FILE, PATCHES_FILE, RESULTS_FILE, SAMPLES_FILE

from helpers import module_blocker

pytestmark = pytest.mark.usefixtures("one_thread")

LATENCY_FILE, ACCURACY_LATENCY_FILE = report.LATENCY_FILE, report.ACCURACY_LATENCY_FILE


PRECISION = {"none": "fp32", "bf16": "bf16 autocast"}  # gfnet-demo --amp -> results.json's "precision"


@pytest.fixture(scope="module", params=[("none", 0), ("none", 1), ("bf16", 0)], ids=["fp32-seed0", "fp32-seed1",
                                                                                   "bf16-seed0"])
def quick_demo(request, tmp_path_factory):
    """One real ``gfnet-demo --quick [--amp AMP] --seed SEED`` run per parameter, shared by the tests below:
    (folder, results dict, exit status, seed). The default (fp32) runs pass no --amp. The quick schedule is too
    short to show the method: the tests check that the claims are computed and reported, not that they hold."""
    from gfnet.cli.demo import main

    amp_name, seed = request.param
    prev = torch.get_num_threads()
    out = tmp_path_factory.mktemp("demo") / "out"
    amp = ["--amp", amp_name] if amp_name != "none" else []
    # the latency figure: eager PyTorch and ONNX Runtime (where installed) once, eager PyTorch alone in the others
    latency = [] if (amp_name, seed) == ("none", 0) else ["--latency", "eager"]
    status = main(["--out", str(out), "--quick", "--no-progress", "--threads", "1", "--seed", str(seed), *amp,
                   *latency])
    assert torch.get_num_threads() == prev  # the demo restores the caller's thread count
    results = json.loads((out / RESULTS_FILE).read_text())
    assert results["precision"] == PRECISION[amp_name]
    assert results["task"]["seed"] == seed
    for stage in (1, 2, 3):  # every stage trained in that precision (the trainer's log says which)
        assert f"amp {amp_name};" in (out / f"stage{stage}" / "train.log").read_text()
    return out, results, status, seed


def test_cluttered_digits_place_the_digit_at_its_box():
    images, labels, boxes = make_cluttered_digits(16, "train", canvas=48, digit_size=12, fragments=0, seed=3)
    assert images.shape == (16, 3, 48, 48) and images.dtype == torch.uint8
    assert labels.min() >= 0 and labels.max() <= 9
    for i in range(16):
        r, c = boxes[i].tolist()
        inside = images[i, 0, r:r + 12, c:c + 12].sum()
        assert inside == images[i, 0].sum() > 0  # without fragments, all ink is in the digit's box
    # same arguments, same images; train and test draw from disjoint digits
    again, _, _ = make_cluttered_digits(16, "train", canvas=48, digit_size=12, fragments=0, seed=3)
    assert torch.equal(images, again)
    cluttered, _, _ = make_cluttered_digits(16, "train", canvas=48, digit_size=12, fragments=3, seed=3)
    assert cluttered.sum() > images.sum()


def test_digit_patch_actions_cover_the_digit():
    boxes = torch.tensor([[0, 0], [36, 36], [10, 20]])
    a = digit_patch_actions(boxes, canvas=48, digit_size=12, patch_size=24)
    corner = torch.floor(a * (48 - 24)).long()
    assert ((corner <= boxes) & (corner + 24 >= boxes + 12)).all()


def test_demo_numbers_and_claims_match_a_recomputation(quick_demo):
    out, results, status, seed = quick_demo
    c = dataclasses.replace(QUICK, seed=seed)
    net = gfnet.load_checkpoint(str(out / CHECKPOINT_FILE)).eval()
    assert net.T == c.T and net.patch_size == c.patch_size
    # The held-out canvases again (seeded), through the checkpoint with the model's own anytime path, in
    # the precision the demo evaluated in.
    test_x, test_y, _ = make_cluttered_digits(c.test_images, "test", c.canvas, c.digit_size, c.fragments, c.seed,
                                              noise=c.noise)
    dtype = {"fp32": None, "bf16 autocast": "bf16"}[results["precision"]]
    probs = net.anytime_predict(test_x, dtype=dtype).probs
    acc = (probs.argmax(-1) == test_y).double().mean(1).mul(100).tolist()
    one_image = 100.0 / c.test_images + 1e-9  # a tie broken otherwise flips at most one image
    assert results["anytime_accuracy_learned_policy"] == pytest.approx(acc, abs=one_image)
    assert net.meta.anytime_classification == results["anytime_accuracy_learned_policy"]
    # The claims, recomputed from the stored accuracies by hand, and the verdict and exit status that follow.
    learned, rand = results["anytime_accuracy_learned_policy"], results["anytime_accuracy_random_patches"]
    claims = results["claims"]
    gain, policy_gain = learned[-1] - learned[0], learned[-1] - rand[-1]
    assert claims["min_gain_points"] == c.min_gain == 10.0
    assert claims["T_steps_beat_glance"] == (gain >= 10.0)
    assert claims["learned_policy_beats_random"] == (policy_gain >= 10.0)
    shown = gain >= 10.0 and policy_gain >= 10.0
    assert results["verdict"] == claims["verdict"] == ("shown" if shown else "not shown")
    assert status == (0 if shown else 3)
    # the signs are printed right: "-5.0 points", never "+-5.0 points"
    assert claims["accuracy_after_T_steps_vs_glance"] == f"{learned[-1]:.1f}% vs {learned[0]:.1f}% ({gain:+.1f} points)"
    assert "+-" not in claims["learned_policy_vs_random_patches_at_T"]
    assert results["glance_accuracy"] == learned[0]
    assert results["anytime_classification"] == learned  # the reference's field names, for gfnet-viz budget
    # The budgeted curve: the stored thresholds applied to the recomputed probabilities give the stored points.
    flops_list, acc_list = net.meta.budgeted_batch_classification
    thresholds = torch.as_tensor(net.meta.dynamic_threshold)
    assert thresholds.shape == (39, c.T) and len(acc_list) == len(flops_list) == 39
    for row in (0, 19, 38):
        a, cost = budget.evaluate(probs, test_y, net.meta.flops, thresholds[row])
        assert a == pytest.approx(acc_list[row], abs=one_image)
        assert cost == pytest.approx(flops_list[row], rel=0.05)
    # the cumulative Multiply-Adds per step are those of the network in the checkpoint
    from gfnet.flops import compute_flops

    assert results["flops"] == compute_flops(net)["flops"]


def test_checkpoint_anytime_accuracy_reproduces_the_demo_in_its_precision(quick_demo):
    from gfnet.demo import checkpoint_anytime_accuracy

    out, results, _, seed = quick_demo
    amp = {"fp32": "none", "bf16 autocast": "bf16"}[results["precision"]]
    acc = checkpoint_anytime_accuracy(str(out / CHECKPOINT_FILE), dataclasses.replace(QUICK, seed=seed), amp)
    assert acc == pytest.approx(results["anytime_accuracy_learned_policy"], abs=100.0 / QUICK.test_images + 1e-9)


def test_report_reads_the_real_demo_folder(quick_demo, capsys):
    from gfnet.cli.viz import main as viz_main

    out, results, _, _ = quick_demo
    assert {CHECKPOINT_FILE, RESULTS_FILE, SAMPLES_FILE} <= set(os.listdir(out))
    # the demo drew its pictures through the report: the same files
    drawn = [str(out / PATCHES_FILE), str(out / BUDGET_CURVE_FILE), str(out / ACCURACY_LATENCY_FILE)]
    assert results["figures"] == drawn
    for name in (PATCHES_FILE, BUDGET_CURVE_FILE, ACCURACY_LATENCY_FILE):
        os.remove(out / name)
    assert viz_main(["report", str(out)]) == 0
    assert capsys.readouterr().out.split() == drawn
    samples = torch.load(out / SAMPLES_FILE, weights_only=True)
    n, S = samples["images"].shape[0], QUICK.canvas
    k = 256 // S
    with Image.open(out / PATCHES_FILE) as im:  # 4 columns, rows of S*k pixels plus a caption block each
        assert im.size[0] >= 10 + 4 * (S * k + 10)
        assert im.size[1] > 10 + (n // 4) * (S * k + 10)
    with Image.open(out / BUDGET_CURVE_FILE) as im:
        assert im.size == (960, 660)


def test_report_names_a_folder_that_is_not_a_demo_output(tmp_path, capsys):
    from gfnet.cli.viz import main as viz_main

    assert viz_main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert CHECKPOINT_FILE in err and "gfnet-demo --out" in err


def test_a_second_demo_into_the_same_folder_is_refused(quick_demo, capsys):
    from gfnet.cli.demo import main

    out, results, _, _ = quick_demo
    before = {name: (out / name).stat().st_mtime_ns for name in os.listdir(out)}
    assert main(["--out", str(out), "--quick", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert {name: (out / name).stat().st_mtime_ns for name in os.listdir(out)} == before  # nothing touched


def test_viz_budget_reads_the_demo_results_file(quick_demo, tmp_path, capsys):
    from gfnet.cli.viz import main as viz_main
    from gfnet.viz.curves import budget_series

    out, results, _, _ = quick_demo
    series = budget_series(str(out / RESULTS_FILE))
    assert series.anytime_acc == results["anytime_accuracy_learned_policy"]
    assert series.budget_acc == results["budgeted_batch_classification"][1]
    assert series.baseline == (results["baseline"]["macs"], results["baseline"]["acc"])
    assert viz_main(["budget", str(out / RESULTS_FILE), "--out", str(tmp_path / "curve.png")]) == 0
    with Image.open(tmp_path / "curve.png") as im:
        assert im.size[0] > 100


def test_full_resolution_baseline_is_recorded(quick_demo):
    import timm

    from gfnet.flops import count_macs

    out, results, _, _ = quick_demo
    base = results["baseline"]
    assert base["epochs"] == QUICK.baseline_epochs and 0.0 <= base["acc"] <= 100.0
    # its Multiply-Adds are those of the backbone on one whole canvas, counted here independently
    model = timm.create_model(QUICK.arch, pretrained=False, num_classes=10).eval()
    assert base["macs"] == count_macs(model, torch.zeros(1, 3, QUICK.canvas, QUICK.canvas))


def test_canvas_tree_holds_the_demo_pixels_and_labels(tmp_path, capsys):
    """gfnet-data demo-canvases writes the held-out canvases losslessly, in class folders whose sorted order is the
    digit; a second call replaces its own tree, and a folder holding other files is refused."""
    from gfnet.cli.data import main as data_main
    from gfnet.demo import CANVAS_TREE_MANIFEST, test_canvases

    root = tmp_path / "canvases"
    assert data_main(["demo-canvases", str(root), "--quick", "--seed", "1", "--train-images", "20"]) == 0
    c = dataclasses.replace(QUICK, seed=1)
    images, labels, _ = test_canvases(c)
    files = sorted((root / "val").glob("*/*.png"), key=lambda p: p.name)
    assert len(files) == len(labels) == c.test_images
    for i, path in enumerate(files):
        assert path.name == f"val_{i:05d}.png" and int(path.parent.name) == int(labels[i])
        with Image.open(path) as im:
            assert torch.equal(torch.from_numpy(np.array(im)), images[i, 0])
    assert len(list((root / "train").glob("*/*.png"))) == 20
    assert data_main(["demo-canvases", str(root), "--quick", "--train-images", "10"]) == 0  # replaces its own
    assert len(list((root / "train").glob("*/*.png"))) == 10
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert data_main(["demo-canvases", str(other), "--quick"]) == 2
    assert "not empty" in capsys.readouterr().err and not (other / CANVAS_TREE_MANIFEST).exists()


def test_gfnet_eval_scores_the_demo_checkpoint_on_its_canvas_tree(quick_demo, tmp_path, capsys):
    """The demo's checkpoint carries its geometry (S = the canvas, no crop) and class names, so gfnet-eval on the
    canvases written by gfnet-data reads the demo's own pixels and labels and reproduces its anytime accuracy."""
    from gfnet.cli.data import main as data_main
    from gfnet.cli.eval import main as eval_main

    out, results, _, seed = quick_demo
    if results["precision"] != "fp32":
        pytest.skip("gfnet-eval is run in fp32 here")
    raw = torch.load(out / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    assert (raw["image_size"], raw["crop_pct"], raw["classes"]) == (QUICK.canvas, 1.0, [str(d) for d in range(10)])
    net = gfnet.load_checkpoint(str(out / CHECKPOINT_FILE))
    assert (net.config.image_size, net.config.crop_pct) == (QUICK.canvas, 1.0)
    root = tmp_path / "canvases"
    assert data_main(["demo-canvases", str(root), "--quick", "--seed", str(seed), "--train-images", "64"]) == 0
    capsys.readouterr()
    assert eval_main(["--checkpoint", str(out / CHECKPOINT_FILE), "--eval-mode", "2", "--data", str(root),
                      "--backend", "torchvision", "--num-threads", "0", "--batch-size", "32"]) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("anytime_classification"))
    anytime = [float(v) for v in line.split("[")[1].rstrip("]").split(",")]
    one_image = 100.0 / QUICK.test_images + 1e-6
    assert anytime == pytest.approx(results["anytime_accuracy_learned_policy"], abs=one_image)


def test_demo_draws_accuracy_against_latency(quick_demo):
    """The demo times its GFNet at budgets of its curve and its full-resolution backbone, one canvas at a time on 1
    thread, in eager PyTorch and (where gfnet[deploy] is installed, with the default --latency auto) ONNX Runtime;
    the accuracies of the figure are those of the stored thresholds on the same canvases."""
    import importlib.util

    from gfnet.deploy.exporter import missing_dependencies

    out, results, _, seed = quick_demo
    lat = results["latency"]
    data = json.loads((out / LATENCY_FILE).read_text())
    auto = (results["precision"], seed) == ("fp32", 0)
    expected = ["eager"] + (["onnx"] if auto and not missing_dependencies("onnx") else [])
    assert [d["runtime"] for d in data] == expected == sorted(lat["runtimes"], key=expected.index)
    assert lat["skipped"] is None and importlib.util.find_spec("torch")
    c = dataclasses.replace(QUICK, seed=seed)
    n = lat["images"]
    assert n == min(c.latency_images, c.test_images) and lat["budgets"] == [0, 19, 38]
    net = gfnet.load_checkpoint(str(out / CHECKPOINT_FILE)).eval()
    test_x, test_y, _ = make_cluttered_digits(c.test_images, "test", c.canvas, c.digit_size, c.fragments, c.seed,
                                              noise=c.noise)
    probs = net.anytime_predict(test_x[:n]).probs
    thresholds = torch.as_tensor(net.meta.dynamic_threshold)
    one_image = 100.0 / n + 1e-9
    for d in data:
        assert d["threads"] == 1 and d["images"] == n and d["cpu"]
        assert [p["budget"] for p in d["points"]] == lat["budgets"]
        for p in d["points"]:
            acc, _ = budget.evaluate(probs, test_y[:n], net.meta.flops, thresholds[p["budget"]])
            assert p["accuracy"] == pytest.approx(acc, abs=one_image)
            assert 0 < p["p50_ms"] <= p["p99_ms"] and p["mean_ms"] > 0
        assert d["backbone"]["accuracy"] == lat["backbone_accuracy_on_these_images"]
        assert d["backbone"]["macs"] == results["baseline"]["macs"] and d["backbone"]["mean_ms"] > 0
    fastest = min(data, key=lambda d: d["all_steps"]["mean_ms"])
    assert lat["fastest_runtime"] == fastest["runtime"] and fastest["runtime"] in lat["sentence"]
    assert lat["sentence"].startswith(("at the backbone's accuracy", "GFNet does not reach"))
    with Image.open(out / ACCURACY_LATENCY_FILE) as im:
        assert im.size[0] > 100


def test_demo_latency_without_the_deploy_packages_says_what_to_install(quick_demo, tmp_path):
    # a machine without gfnet[deploy] (its modules blocked in a fresh interpreter): the figure is eager PyTorch's,
    # and the summary says what was skipped and what to install
    out, results, _, seed = quick_demo
    if (results["precision"], seed) != ("fp32", 0):
        pytest.skip("one demo checkpoint is enough")
    # torch and timm first: torch._dynamo probes optional modules with find_spec when it is imported
    blocker = module_blocker("onnxscript", "onnxruntime", "executorch")
    code = "import dataclasses, json, timm, torch, gfnet\n" + blocker + (
        "import gfnet.deploy.latency\n"
        "from gfnet.demo import QUICK, measure_latency, test_canvases\n"
        f"c = dataclasses.replace(QUICK, seed={seed}, latency_images=4, latency_budgets=2)\n"
        f"net = gfnet.load_checkpoint({str(out / CHECKPOINT_FILE)!r}).eval()\n"
        "x, y, _ = test_canvases(c)\n"
        "backbone = timm.create_model(c.arch, pretrained=False, num_classes=10)\n"
        f"res = measure_latency(net, net.meta.dynamic_threshold, x, y, backbone, c, {str(tmp_path)!r})\n"
        "print(json.dumps(res))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(res["runtimes"]) == ["eager"] and res["budgets"] == [0, 38]
    assert res["skipped"].startswith("ONNX Runtime latency skipped: it needs onnxscript, onnxruntime")
    assert "pip install 'gfnet[deploy]'" in res["skipped"]
    assert [d["runtime"] for d in json.loads((tmp_path / LATENCY_FILE).read_text())] == ["eager"]
