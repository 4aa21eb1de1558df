"""The benchmark plumbing: the harness's numbers, the rows it makes, and that a suite refuses to time a
provider whose output differs from its baseline's (a wrong kernel injected for real)."""
import time

import pytest
import torch

from gfnet.bench.common import OutputMismatch, check_close, make_rows, measure, use_threads


def test_measure_times_each_provider_with_rounds():
    calls = {"slow": 0, "fast": 0}

    def slow():
        calls["slow"] += 1
        time.sleep(0.02)

    def fast():
        calls["fast"] += 1

    timings = measure({"slow": slow, "fast": fast}, min_run_time=0.0, rounds=3)
    assert len(timings["slow"].round_medians) == 3 and timings["slow"].runs >= 3
    assert timings["slow"].median_s >= 0.02  # sleep() never returns early: a lower bound, not a speed claim
    assert calls["slow"] >= 6  # each round: one warm-up call, then the timed block(s)
    rows = make_rows("t", "case", timings, "slow", device=torch.device("cpu"), dtype="float32", batch=4, items=8,
                     unit="images/s", extra={"fast": {"k": 1}})
    assert [r.provider for r in rows] == ["slow", "fast"] and all(r.baseline == "slow" for r in rows)
    assert rows[0].ratio == 1.0 and rows[0].is_baseline and not rows[1].is_baseline
    assert rows[1].ratio > 1.0 and rows[1].extra == {"k": 1} and rows[0].extra == {}
    assert rows[0].throughput == pytest.approx(8 / timings["slow"].median_s)
    assert rows[0].threads == torch.get_num_threads()


def test_use_threads_sets_and_restores():
    before = torch.get_num_threads()
    with use_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="--threads must be >= 1"):
        with use_threads(0):
            pass


def test_check_close_states_the_tolerance():
    ref = torch.zeros(4)
    assert check_close("x", ref + 1e-4, ref, atol=1e-3) == pytest.approx(1e-4)
    with pytest.raises(OutputMismatch, match=r"x: 1 of 4 values differ beyond atol=0.001.*because"):
        check_close("x", torch.tensor([0.0, 0.0, 0.5, 0.0]), ref, atol=1e-3, why="because")


def test_kernels_suite_refuses_a_wrong_crop(monkeypatch):
    """A focus crop one pixel off (its row offset shifted) must stop the suite before anything is timed."""
    from gfnet import ops
    from gfnet.bench import bench_kernels

    right = ops.focus_crop

    def off_by_one(images, actions, patch_size, **kw):
        out = right(images, actions, patch_size, **kw)
        return torch.roll(out, 1, dims=-2)

    timed = []
    monkeypatch.setattr(bench_kernels.ops, "focus_crop", off_by_one)
    monkeypatch.setattr(bench_kernels, "measure", lambda *a, **k: timed.append(1) or {})
    monkeypatch.setattr(bench_kernels, "copy_bandwidth", lambda device, t: 1e9)
    with pytest.raises(OutputMismatch, match=r"kernels focus_crop P=96 uint8 HWC: gfnet \(cpp\) against reference"):
        bench_kernels.run(device="cpu", quick=True, batch_size=3)
    assert timed == []


def test_budget_suite_refuses_exits_that_differ_from_the_simulation():
    from types import SimpleNamespace

    from gfnet.bench.bench_budget import _check_exits

    probs = torch.tensor([[[0.9, 0.1], [0.6, 0.4]], [[0.2, 0.8], [0.7, 0.3]]])  # [T=2, N=2, C=2]
    thresholds = torch.tensor([0.8, -1e8])
    right = SimpleNamespace(exit_step=torch.tensor([0, 1]), preds=torch.tensor([0, 0]))
    assert _check_exits("p=5", right, probs, thresholds) == 1.0
    wrong = SimpleNamespace(exit_step=torch.tensor([1, 1]), preds=torch.tensor([1, 0]))
    with pytest.raises(OutputMismatch, match="budget p=5: 1 of 2 images exit or predict differently"):
        _check_exits("p=5", wrong, probs, thresholds)
    # a confidence within 1e-5 of its threshold may fall either way
    assert _check_exits("p=5", wrong, probs, torch.tensor([0.9 - 1e-6, -1e8])) == 0.5


def test_bench_settings_reach_the_suite_and_are_checked():
    from gfnet.bench import bench_budget
    from gfnet.cli._errors import UsageError
    from gfnet.cli.bench import _settings

    got = _settings(["num_images=2048", "arch=resnet50", "points=(5, 15)"], "budget", bench_budget)
    assert got == {"num_images": 2048, "arch": "resnet50", "points": (5, 15)}
    with pytest.raises(UsageError, match="suite 'budget' takes .*num_images"):
        _settings(["images=3"], "budget", bench_budget)
    with pytest.raises(UsageError, match="NAME=VALUE"):
        _settings(["num_images"], "budget", bench_budget)


def _perf_suite(*args):
    """Run the pytest-benchmark suite (bench/perf) in a subprocess with benchmarks disabled: each
    benchmark's function runs once, after its output check."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(root, "tests"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "pytest", "bench/perf", "-q", "-p", "no:cacheprovider",
                           "--benchmark-disable", *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)


def test_perf_suite_runs_and_refuses_a_wrong_kernel():
    """The regression suite of CONTRIBUTING runs (every kernel and one step of each mode, once), and a
    kernel that is fast but wrong fails it before it is timed."""
    ok = _perf_suite()
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-2000:]
    assert "11 passed" in ok.stdout
    broken = _perf_suite("-p", "perf_fault_plugin", "-k", "test_focus_crop and not bilinear")
    assert broken.returncode == 1 and "2 failed" in broken.stdout, broken.stdout[-3000:]
    assert "Mismatched elements: 1 /" in broken.stdout
