"""gfnet.viz and gfnet-viz: files of the expected size, boxes exactly where the actions say (read back
from the PNG's pixels), budget curves from reference-format checkpoints and results files, bench plots."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import gfnet
from gfnet import viz
from gfnet.cli.viz import main as viz_main
from gfnet.models import AnytimePrediction
from gfnet.viz.bench_rows import Row

ARCH, P, T, S, CLASSES = "test_efficientnet", 16, 3, 64, 10
GREY = (128, 128, 128)
MEAN = torch.tensor(viz.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(viz.IMAGENET_STD).view(1, 3, 1, 1)


def grey_images(n, size=S, value=128):
    """Normalised images that denormalise to a uniform RGB (value, value, value)."""
    return (torch.full((n, 3, size, size), value / 255.0) - MEAN) / STD


def fake_meta(T=T, points=39):
    """Plausible reference-format evaluation fields: costs rise with the budget, accuracy too."""
    flops = [1.0e6 * (1 + 1.3 * t) for t in range(T)]
    budget_macs = np.linspace(flops[0], flops[-1], points).tolist()
    budget_acc = (60 + 25 * (1 - np.exp(-3 * np.linspace(0, 1, points)))).tolist()
    return dict(flops=flops, anytime_classification=[62.0, 78.5, 84.0][:T],
                budgeted_batch_classification=[budget_macs, budget_acc],
                dynamic_threshold=torch.linspace(0.9, 0.3, points * T).view(points, T).contiguous())


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return gfnet.build_model(ARCH, patch_size=P, T=T, num_classes=CLASSES).eval()


@pytest.fixture(scope="module")
def checkpoint(net, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth.tar"
    gfnet.save_checkpoint(net, str(path), **fake_meta())
    return str(path)


def read_png(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def with_fixed_actions(net, action):
    """A copy of ``net`` whose policy always proposes ``action`` (actor weights 0, bias = logit)."""
    import copy

    fixed = copy.deepcopy(net)
    linear = fixed.policy.actor[0]
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(torch.logit(torch.tensor(action)))
    return fixed


# ------------------------------------------------------------------------------------------- geometry
def test_patch_boxes_follow_floor_of_action_times_free_range():
    actions = torch.tensor([[[0.0, 1.0], [0.26, 0.7]], [[0.5, 0.999], [1.0, 0.0]]])  # [T-1=2, N=2, 2]
    boxes = viz.patch_boxes(actions, image_size=64, patch_size=16)
    assert boxes.shape == (2, 2, 4) and boxes.dtype == torch.int64
    expected = torch.tensor([[[0, 48, 16, 64], [12, 33, 28, 49]],  # 0.26*48 = 12.48, 0.7*48 = 33.6
                             [[24, 47, 40, 63], [48, 0, 64, 16]]])  # 0.999*48 = 47.95
    assert torch.equal(boxes, expected)
    assert viz.patch_boxes(torch.tensor([[0.5, 0.5]]), 224, 96).tolist() == [[64, 64, 160, 160]]
    with pytest.raises(ValueError, match="row, column"):
        viz.patch_boxes(torch.zeros(2, 3), 64, 16)


def test_patch_boxes_are_the_crops_the_local_encoder_sees():
    torch.manual_seed(1)
    images = torch.randn(5, 3, 37, 37)  # odd size: S - P = 21
    actions = torch.rand(5, 2)
    actions[0] = torch.tensor([1.0, 0.0])
    crops = gfnet.ops.focus_crop(images, actions, 16)
    for i, (r0, c0, r1, c1) in enumerate(viz.patch_boxes(actions, 37, 16).tolist()):
        assert torch.equal(crops[i], images[i, :, r0:r1, c0:c1])


def test_exit_steps_first_confident_step_else_last():
    probs = torch.tensor([[[0.9, 0.1], [0.6, 0.4], [0.5, 0.5]],
                          [[0.2, 0.8], [0.7, 0.3], [0.55, 0.45]],
                          [[0.5, 0.5], [0.5, 0.5], [0.6, 0.4]]])  # [T=3, N=3, C=2]
    assert viz.exit_steps(probs, [0.8, 0.7, -1e8]).tolist() == [0, 1, 2]
    # no threshold reached anywhere: every image runs all T steps
    assert viz.exit_steps(probs, [1.1, 1.1, 1.1]).tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="one threshold per step"):
        viz.exit_steps(probs, torch.zeros(39, 3))


# ------------------------------------------------------------------------------------------- patches
def test_boxes_land_where_the_policy_says_in_the_png(net, tmp_path):
    fixed = with_fixed_actions(net, [0.26, 0.7])  # corner (12, 33) on a 64-pixel image, 16-pixel patch
    k, lw = 4, 3
    out = tmp_path / "patches.png"
    grid = viz.plot_patches(fixed, grey_images(2), out, scale=k, line_width=lw, ncols=4)
    assert torch.equal(grid.boxes, torch.tensor([12, 33, 28, 49]).expand(T - 1, 2, 4))
    png = read_png(out)
    assert (png.shape[1], png.shape[0]) == grid.size
    assert grid.origins[0] == (10, 10) and grid.origins[1][0] == 10 and grid.origins[1][1] > 10 + S * k
    last = tuple(viz.STEP_COLORS[T - 1])  # the last step is drawn on top of the identical earlier one
    glance = tuple(viz.STEP_COLORS[0])
    r0, c0, r1, c1 = 12 * k, 33 * k, 28 * k, 49 * k
    rm, cm = (r0 + r1) // 2, (c0 + c1) // 2
    for y, x in grid.origins:
        px = lambda r, c: tuple(int(v) for v in png[y + r, x + c])  # noqa: E731
        for r in range(r0, r0 + lw):  # top and bottom borders: exactly lw rows, on the patch's own pixels
            assert px(r, cm) == last and px(r1 - 1 - (r - r0), cm) == last
        for c in range(c0, c0 + lw):  # left and right borders
            assert px(rm, c) == last and px(rm, c1 - 1 - (c - c0)) == last
        assert px(r0 - 1, cm) == GREY and px(r1, cm) == GREY  # just outside: the image
        assert px(rm, c0 - 1) == GREY and px(rm, c1) == GREY
        assert px(r0 + lw, cm) == GREY and px(rm, cm) == GREY and px(rm, c0 + lw) == GREY  # inside
        # the glance frames the whole image with its outermost lw pixels; the background is white
        assert px(0, S * k // 2) == glance and px(lw - 1, S * k // 2) == glance and px(lw, S * k // 2) == GREY
        assert px(-1, S * k // 2) == (255, 255, 255)


def test_each_step_has_its_colour_and_exit_is_reported(tmp_path):
    actions = torch.tensor([[[0.0, 0.0]], [[1.0, 1.0]]])  # step 2 top-left, step 3 bottom-right
    probs = torch.tensor([[[0.5, 0.3, 0.2]], [[0.7, 0.2, 0.1]], [[0.9, 0.05, 0.05]]])
    k, lw = 3, 2
    grid = viz.plot_patches(None, grey_images(1, size=40), tmp_path / "p.png", patch_size=10, scale=k,
                            line_width=lw, prediction=AnytimePrediction(probs, actions),
                            thresholds=[0.8, 0.65, -1e8], labels=[0], class_names=["cat", "dog", "owl"])
    assert grid.exit_step.tolist() == [1]
    assert grid.boxes[:, 0].tolist() == [[0, 0, 10, 10], [30, 30, 40, 40]]
    png = read_png(tmp_path / "p.png")
    y, x = grid.origins[0]
    px = lambda r, c: tuple(int(v) for v in png[y + r, x + c])  # noqa: E731
    # step 2's box: its bottom edge (row 10*k - 1) and right edge; step 3's top edge at row 30*k
    assert px(10 * k - 1, 5 * k) == viz.STEP_COLORS[1] and px(5 * k, 10 * k - 1) == viz.STEP_COLORS[1]
    assert px(10 * k, 5 * k) == GREY
    assert px(30 * k, 35 * k) == viz.STEP_COLORS[2] and px(30 * k - 1, 35 * k) == GREY
    assert px(20 * k, 20 * k) == GREY
    assert (png.shape[1], png.shape[0]) == grid.size


def test_plot_patches_rejects_inconsistent_inputs(net, tmp_path):
    with pytest.raises(ValueError, match="labels"):
        viz.plot_patches(net, grey_images(2), tmp_path / "x.png", labels=[1, 2, 3])
    with pytest.raises(ValueError, match="net to run"):
        viz.plot_patches(None, grey_images(2), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_denormalize_round_trips_uint8():
    pixels = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    normalised = (pixels.float() / 255 - MEAN) / STD
    assert np.array_equal(viz.denormalize(normalised), pixels.permute(0, 2, 3, 1).numpy())
    assert np.array_equal(viz.denormalize(pixels), pixels.permute(0, 2, 3, 1).numpy())


def test_load_images_resizes_shorter_side_and_centre_crops(tmp_path):
    arr = np.zeros((60, 90, 3), dtype=np.uint8)
    arr[:, 30:60] = (200, 100, 50)  # a centre band; the crop of the middle 60 columns keeps its edges
    Image.fromarray(arr).save(tmp_path / "b.png")
    Image.fromarray(np.full((40, 40, 3), 128, dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    images, files = viz.load_images(tmp_path, image_size=30, crop_pct=1.0, interpolation="nearest")
    assert [os.path.basename(f) for f in files] == ["a.png", "b.png"]
    assert images.shape == (2, 3, 30, 30)
    shown = viz.denormalize(images)
    assert (shown[0] == 128).all()
    # b: 60x90 -> 30x45, centre crop columns 8..37: the band (columns 15..29 after resize) -> 7..21
    assert tuple(shown[1, 15, 15]) == (200, 100, 50) and tuple(shown[1, 15, 2]) == (0, 0, 0)
    with pytest.raises(FileNotFoundError):
        viz.load_images(tmp_path / "missing", 30)


def test_load_images_is_the_evaluation_loaders_transform(tmp_path):
    """The pictures show exactly the pixels the evaluation loader feeds the network: sizes whose resized long
    side is truncated (55 * 36 / 50 = 39.6 -> 39) and whose crop offsets land on .5."""
    from gfnet.data import make_loader

    rng = np.random.default_rng(0)
    for k, (w, h) in enumerate([(55, 50), (57, 50), (50, 63), (41, 70)]):
        d = tmp_path / "val" / f"c{k}"
        d.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / "x.png")
    for interpolation in ("bilinear", "bicubic"):
        loader = make_loader(tmp_path, False, 8, image_size=32, crop_pct=0.875, interpolation=interpolation,
                             backend="torchvision", num_threads=0, cache_dir=str(tmp_path / "cache"))
        expected = torch.cat([x for x, _ in loader])
        images, files = viz.load_images(tmp_path / "val", 32, crop_pct=0.875, interpolation=interpolation)
        assert [os.path.relpath(f, tmp_path) for f in files] == [f"val/c{k}/x.png" for k in range(4)]
        assert torch.equal(images, expected)


def test_read_thresholds_forms(tmp_path):
    meta = {"dynamic_threshold": torch.arange(39 * 3, dtype=torch.float32).view(39, 3)}
    assert viz.read_thresholds("19", meta).tolist() == [57.0, 58.0, 59.0]
    assert viz.read_thresholds("0.9,0.5,-1e8").tolist() == pytest.approx([0.9, 0.5, -1e8])
    (tmp_path / "t.json").write_text(json.dumps({"thresholds": [0.7, 0.6, -1e8]}))
    assert viz.read_thresholds(str(tmp_path / "t.json")).tolist() == pytest.approx([0.7, 0.6, -1e8])
    (tmp_path / "t.txt").write_text("0.1 0.2\n-1e8\n")
    assert viz.read_thresholds(str(tmp_path / "t.txt")).tolist() == pytest.approx([0.1, 0.2, -1e8])
    with pytest.raises(ValueError, match="dynamic_threshold"):
        viz.read_thresholds("3", {})
    with pytest.raises(ValueError, match="outside"):
        viz.read_thresholds("39", meta)


# ------------------------------------------------------------------------------------------- budget
def test_budget_curve_from_reference_checkpoint_png_and_svg(checkpoint, tmp_path):
    meta = fake_meta()
    series = viz.plot_budget_curve(checkpoint, tmp_path / "curve.png", baseline=(2.6e6, 80.0))
    (s,) = series
    assert s.budget_macs == pytest.approx(meta["budgeted_batch_classification"][0])
    assert s.budget_acc == pytest.approx(meta["budgeted_batch_classification"][1])
    assert s.anytime_macs == pytest.approx(meta["flops"]) and s.anytime_acc == meta["anytime_classification"]
    assert ARCH in s.label
    with Image.open(tmp_path / "curve.png") as im:
        assert im.size == (960, 660)  # figsize (6.4, 4.4) inches at 150 dpi
    viz.plot_budget_curve([checkpoint], tmp_path / "curve.svg", labels=["tiny"])
    text = (tmp_path / "curve.svg").read_text()
    assert "<svg" in text and "tiny: budgeted" in text and "MMACs" in text


def test_budget_curve_from_results_json_and_several_sources(checkpoint, tmp_path):
    results = {"label": "demo", "eval": {
        "budget_curve": [{"macs": 1.2e6, "acc": 70.0}, {"macs": 2.0e6, "acc": 80.0}],
        "anytime_classification": [60.0, 75.0], "flops": [1.0e6, 2.2e6], "baseline": {"macs": 3e6, "top1": 79.0}}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    series = viz.plot_budget_curve([str(path), checkpoint], tmp_path / "both.png", dpi=50, figsize=(8, 5))
    assert [s.label for s in series][0] == "demo"
    assert series[0].budget_macs == [1.2e6, 2.0e6] and series[0].budget_acc == [70.0, 80.0]
    assert series[0].baseline == (3e6, 79.0)
    with Image.open(tmp_path / "both.png") as im:
        assert im.size == (400, 250)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"loss": 1.0}))
    with pytest.raises(ValueError, match="no budget or anytime results"):
        viz.plot_budget_curve(str(bad), tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"\.png, \.svg or \.pdf"):
        viz.plot_budget_curve(str(path), tmp_path / "curve.jpg")


# ------------------------------------------------------------------------------------------- bench
def bench_rows():
    """Rows of two suites as the suites make them (gfnet.bench.rows.Row); two cases in kernels."""
    def row(suite, case, provider, baseline, median, ratio, unit="patches/s"):
        return Row(suite=suite, case=case, provider=provider, device="cpu", dtype="uint8 HWC", batch=64, threads=2,
                   median_s=median, iqr_s=median / 20, runs=5, throughput=64 / median, unit=unit,
                   baseline=baseline, ratio=ratio, extra={"gbytes_per_s": 1.5})
    return [row("kernels", "focus_crop P=96", "reference loop", "reference loop", 10e-3, 1.0),
            row("kernels", "focus_crop P=96", "gfnet (cpp)", "reference loop", 2e-3, 5.0),
            row("kernels", "glance_resize P=96", "interpolate", "interpolate", 40e-3, 1.0),
            row("kernels", "glance_resize P=96", "gfnet (cpp)", "interpolate", 5e-3, 8.0),
            row("budget", "mobilenet", "all_steps", "all_steps", 2.0, 1.0, "images/s"),
            row("budget", "mobilenet", "budgeted p=5", "all_steps", 1.0, 1.8, "images/s")]


def write_bench(tmp_path, rows=None):
    """Write the rows as gfnet-bench does, one file per suite; returns the JSON paths."""
    from gfnet.bench.rows import write_results

    rows = rows or bench_rows()
    env = {"device_name": "AMD EPYC", "device_type": "cpu", "cpus": 2, "torch": "2.x", "triton": None,
           "python": "3.11", "git": "abc123-dirty", "load_average": [1.0, 1.0, 1.0], "note": "test"}
    paths = []
    for suite in ("kernels", "budget"):
        paths.append(write_results(str(tmp_path), suite, env, [r for r in rows if r.suite == suite],
                                   extra_columns=("gbytes_per_s",))["json"])
    return paths


def test_bench_results_round_trip_and_markdown(tmp_path):
    from gfnet.bench.rows import read_results

    kernels_json, _ = write_bench(tmp_path)
    results = read_results(kernels_json)
    assert results.suite == "kernels" and results.env["git"] == "abc123-dirty"
    assert results.rows == [r for r in bench_rows() if r.suite == "kernels"]
    md = (tmp_path / "kernels_cpu.md").read_text()
    assert "| focus_crop P=96 | gfnet (cpp) | uint8 HWC | 64 | 2 | 2.000 ms | 100.0 us | 5 |" in md
    assert "reference loop (baseline)" in md and "5.00x" in md and "| 1.5 |" in md
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]  # atomic writes leave nothing behind


def test_bench_reader_refuses_other_formats_by_name(tmp_path):
    from gfnet.bench.rows import read_results

    old = tmp_path / "old.json"  # the free-form rows the suites wrote before the Row format
    old.write_text(json.dumps([{"suite": "kernels", "provider": "gfnet", "median_s": 1.0}]))
    with pytest.raises(ValueError, match="not a gfnet-bench/1 results file.*gfnet-bench SUITE --out-dir"):
        read_results(str(old))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "gfnet-bench/1", "suite": "x", "env": {}, "rows": [{"suite": "x"}]}))
    with pytest.raises(ValueError, match="lacks the field"):
        read_results(str(bad))


def test_plot_bench_one_png_per_suite(tmp_path):
    paths = write_bench(tmp_path)
    written = viz.plot_bench(paths, tmp_path / "bench.png", dpi=100)
    assert [os.path.basename(p) for p in written] == ["bench_kernels.png", "bench_budget.png"]
    for p in written:
        with Image.open(p) as im:
            assert im.size[0] == 900 and im.size[1] > 300  # 9 inches wide at 100 dpi, height grows with rows
    single = viz.plot_bench(bench_rows()[:2], tmp_path / "out")  # rows as is, into a folder: <suite>.png
    assert single == [str(tmp_path / "out" / "kernels.png")] and os.path.isfile(single[0])


def test_bench_command_checks_the_out_dir_before_running(tmp_path, monkeypatch, capsys):
    import gfnet.bench.bench_kernels as suite
    from gfnet.cli.bench import main as bench_main

    def must_not_run(**kwargs):
        raise AssertionError("the suite ran although its results could not be written")

    monkeypatch.setattr(suite, "run", must_not_run)
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a folder cannot be made under a file, not even by root
    target = str(blocker / "results")
    try:  # an OSError naming the folder, or (under a command wrapper that reports errors) exit status != 0
        rc, message = bench_main(["kernels", "--quick", "--out-dir", target]), capsys.readouterr().err
    except OSError as e:
        rc, message = None, str(e)
    assert rc != 0 and target in message


# ------------------------------------------------------------------------------------------- CLI
def test_cli_patches_on_a_checkpoint_and_a_folder(checkpoint, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(folder / "one.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "two.png")
    out = tmp_path / "viz.png"
    rc = viz_main(["--checkpoint", checkpoint, "--images", str(folder), "--out", str(out),
                   "--thresholds", "19", "--image-size", "48", "--labels", "3", "7"])
    assert rc == 0 and "2 images" in capsys.readouterr().out
    k = 256 // 48
    fs = max(11, min(16, 48 * k // 16))
    with Image.open(out) as im:
        w, h = im.size
    assert h == 10 + (48 * k + 4 + (fs + 5) * (T + 1)) + 10  # one row: image, then a title and T lines
    assert w >= 10 + 2 * (48 * k + 10)
    rc = viz_main(["patches", "--checkpoint", checkpoint, "--images", str(folder / "missing.png"),
                   "--out", str(tmp_path / "x.png")])
    assert rc == 2 and "no image file" in capsys.readouterr().err


def test_cli_budget_and_bench(checkpoint, tmp_path):
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"budgeted_batch_classification": [[1e6, 2e6], [60.0, 70.0]]}))
    assert viz_main(["budget", checkpoint, str(results), "--out", str(tmp_path / "c.svg"),
                     "--baseline", "2.5e6", "71"]) == 0
    assert "<svg" in (tmp_path / "c.svg").read_text()
    paths = write_bench(tmp_path / "results")
    assert viz_main(["bench", *paths, "--out", str(tmp_path / "bench")]) == 0
    assert sorted(os.listdir(tmp_path / "bench")) == ["budget.png", "kernels.png"]
    rc = viz_main(["bench", str(tmp_path / "c.svg"), "--out", str(tmp_path / "x")])
    assert rc == 2
