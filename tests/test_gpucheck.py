"""gfnet-bench gpucheck on a CPU: the report written atomically before and after every check (a real SIGKILL and
SIGTERM midway leave a valid JSON with the finished checks), checks isolated in worker processes (a native abort
or a hang costs that check only), the budget, and skips with reasons for what the machine lacks."""
import json
import os
import signal
import subprocess
import sys
import time

import gpucheck_faults as faults
import pytest
import torch

from gfnet.bench import gpucheck
from gfnet.bench.gpucheck import Check, Context, Skip


def _report(out):
    return json.loads((out / "gpucheck.json").read_text())


def _statuses(report):
    return {c["name"]: c["status"] for c in report["checks"]}


def _start(out, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.Popen([sys.executable, "-m", "gfnet.bench.gpucheck", "--dry-run", "--out", str(out), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_for(out, condition, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = out / "gpucheck.json"
        if path.exists():
            report = _report(out)  # a reader never meets a half-written file (written atomically)
            if condition(report):
                return report
        if proc.poll() is not None:
            raise AssertionError(f"gpucheck ended early: {proc.stdout.read().decode()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the report")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie is dead
        return fh.read().split()[2] != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="Linux process semantics")
def test_a_killed_run_leaves_every_finished_check_on_disk(tmp_path):
    out = tmp_path / "gc"
    proc = _start(out, "--only", "uint8_division", "nan", "kernels", "budgeted_fp32")
    report = _wait_for(out, lambda r: _statuses(r)["uint8_division"] == "passed", proc)
    proc.send_signal(signal.SIGKILL)  # no handler can run: only what was written before counts
    proc.wait(30)
    report = _report(out)
    statuses = _statuses(report)
    assert statuses["uint8_division"] == "passed" and report["complete"] is False
    assert set(statuses.values()) <= {"passed", "running", "pending"}
    assert statuses["budgeted_fp32"] == "pending"
    assert "0 failed" in (out / "gpucheck.md").read_text() and "pending" in (out / "gpucheck.md").read_text()
    worker = report["environment"]["worker_pid"]
    deadline = time.monotonic() + 20
    while _alive(worker) and time.monotonic() < deadline:  # the worker dies with its parent, holding nothing
        time.sleep(0.1)
    assert not _alive(worker)


@pytest.mark.skipif(sys.platform != "linux", reason="Linux process semantics")
def test_sigterm_records_the_interrupted_check(tmp_path):
    out = tmp_path / "gc"
    proc = _start(out, "--only", "kernels", "nan")
    _wait_for(out, lambda r: _statuses(r)["kernels"] == "running", proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)  # what `timeout` sends
    assert proc.wait(30) == 128 + signal.SIGTERM
    report = _report(out)
    (kernels,) = [c for c in report["checks"] if c["name"] == "kernels"]
    assert kernels["status"] == "failed" and "interrupted by signal 15" in kernels["reason"]
    assert _statuses(report)["nan"] == "pending"


def test_a_crash_or_a_hang_costs_one_check(tmp_path):
    checks = [Check("first", faults.passes, "test", 1), Check("abort", faults.aborts, "test", 1),
              Check("hang", faults.hangs, "test", 1, deadline=3), Check("error", faults.raises, "test", 1),
              Check("last", faults.passes, "test", 1)]
    out = tmp_path / "gc"
    out.mkdir()
    report = gpucheck.run_plan(checks, str(out), dry_run=True, budget_s=600, log=lambda line: None)
    results = {r.name: r for r in report.results}
    assert [r.status for r in report.results] == ["passed", "failed", "failed", "failed", "passed"]
    assert "died during the check (signal 6)" in results["abort"].reason
    assert "deadline of 3 s" in results["hang"].reason
    assert "garbage" in results["error"].reason and "Traceback" in results["error"].details["traceback"]
    # each failure replaced the worker: the last check ran in a fresh process
    assert results["last"].details["pid"] != results["first"].details["pid"]
    on_disk = _report(out)
    assert on_disk["complete"] is True and [c["status"] for c in on_disk["checks"]] == [
        "passed", "failed", "failed", "failed", "passed"]


@pytest.mark.skipif(sys.platform != "linux", reason="Linux process semantics")
def test_a_check_killed_at_its_deadline_leaves_no_child_process(tmp_path):
    out = tmp_path / "gc"
    out.mkdir()
    report = gpucheck.run_plan([Check("child", faults.starts_a_child_and_hangs, "test", 1, deadline=15)], str(out),
                               dry_run=True, budget_s=600, log=lambda line: None)
    (result,) = report.results
    assert result.status == "failed" and "deadline of 15 s" in result.reason
    child = int((out / "child.pid").read_text())
    deadline = time.monotonic() + 20
    while _alive(child) and time.monotonic() < deadline:  # the child dies with the killed worker
        time.sleep(0.1)
    alive = _alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive


def test_checks_that_no_longer_fit_the_budget_are_skipped_with_the_reason(tmp_path):
    out = tmp_path / "gc"
    assert gpucheck.main(["--dry-run", "--out", str(out), "--budget-s", "30", "--only", "compiled_model",
                          "cuda_tests"]) == 0
    report = _report(out)
    assert _statuses(report) == {"compiled_model": "skipped", "cuda_tests": "skipped"}
    assert all("budget" in c["reason"] and "--only" in c["reason"] for c in report["checks"])
    assert report["complete"] is True


def test_a_check_the_budget_stops_midway_is_skipped_not_failed(tmp_path):
    out = tmp_path / "gc"
    out.mkdir()
    budget = gpucheck.RESERVE_S + 15  # less than the hanging check's own deadline (31 s)
    start = time.monotonic()
    report = gpucheck.run_plan([Check("hang", faults.hangs, "test", 1)], str(out), dry_run=True, budget_s=budget,
                               log=lambda line: None)
    assert time.monotonic() - start < budget + 15
    (result,) = report.results
    assert result.status == "skipped" and result.reason.startswith("budget:") and "--only hang" in result.reason


def test_the_plan_puts_correctness_first_and_bench_suites_last():
    groups = [c.group for c in gpucheck.plan()]
    assert groups[0] == "kernels" and groups.index("engine") < groups.index("training") < groups.index("bench")
    assert all(g == "bench" for g in groups[groups.index("bench"):])
    assert "bench" not in {c.group for c in gpucheck.plan(bench=False)}


def test_list_prints_the_checks_with_their_estimates(capsys):
    assert gpucheck.main(["--list", "--no-bench"]) == 0
    out = capsys.readouterr().out
    assert "kernels" in out and "per group:" in out and "engine" in out


def test_gpucheck_refuses_a_file_as_its_folder(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        gpucheck.main(["--dry-run", "--out", str(target)])
    assert exit_info.value.code == 2


# -------------------------------------------------------------------------- what the machine lacks

def _gpu_context(tmp_path):
    return Context(torch.device("cuda", 0), False, str(tmp_path))  # nothing below touches the device


def test_cuda_tests_skip_with_the_reason_without_pytest(monkeypatch, tmp_path):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pytest" else real(name, *a))
    with pytest.raises(Skip, match="pytest is not installed"):
        gpucheck.check_cuda_tests(_gpu_context(tmp_path))


@pytest.mark.parametrize("check", [gpucheck.check_dali, gpucheck.CHECKS["bench_data"].fn])
def test_dali_checks_skip_with_the_reason_without_dali(monkeypatch, tmp_path, check):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("nvidia") else real(name, *a))
    with pytest.raises(Skip, match="DALI is not installed"):
        check(_gpu_context(tmp_path))


def test_gpu_only_checks_skip_with_the_reason_in_the_dry_run(tmp_path):
    out = tmp_path / "gc"
    assert gpucheck.main(["--dry-run", "--out", str(out), "--only", "host_syncs", "second_gpu", "cuda_tests"]) == 0
    report = _report(out)
    assert _statuses(report) == {"host_syncs": "skipped", "second_gpu": "skipped", "cuda_tests": "skipped"}
    assert all("needs a CUDA GPU" in c["reason"] for c in report["checks"])
    assert {"device", "driver", "torch", "cuda", "triton"} <= set(report["environment"])
    assert "0 passed, 0 failed, 3 skipped" in (out / "gpucheck.md").read_text()


def test_the_report_goes_to_bench_results_with_the_card_name_by_default(tmp_path, monkeypatch):
    checkout = tmp_path / "checkout"
    (checkout / "bench" / "results").mkdir(parents=True)
    monkeypatch.setattr(gpucheck, "__file__", str(checkout / "bench" / "gpucheck.py"))
    assert gpucheck.default_out("NVIDIA H100 80GB HBM3") == str(
        checkout / "bench" / "results" / "gpucheck_nvidia_h100_80gb_hbm3")
    assert gpucheck.default_out("cpu dry run").endswith("gpucheck_cpu_dry_run")
    (checkout / "bench" / "results").rmdir()  # an installed copy without the checkout: the current folder
    monkeypatch.chdir(tmp_path)
    assert gpucheck.default_out("Tesla V100-SXM2-16GB") == str(tmp_path / "gpucheck_tesla_v100_sxm2_16gb")


@pytest.mark.skipif(sys.platform != "linux", reason="Linux process semantics")
def test_a_run_without_dali_skips_its_checks_with_the_reason_and_exits_cleanly(tmp_path):
    # a regular package named nvidia ahead of the environment's: nvidia.dali cannot be found (the workers inherit
    # the path), as on a machine with torch's CUDA libraries and no DALI
    shadow = tmp_path / "shadow" / "nvidia"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    out = tmp_path / "gc"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "shadow"), *sys.path]))
    proc = subprocess.run([sys.executable, "-m", "gfnet.bench.gpucheck", "--dry-run", "--out", str(out), "--only",
                           "dali", "bench_data", "uint8_division"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = _report(out)
    assert _statuses(report) == {"uint8_division": "passed", "dali": "skipped", "bench_data": "skipped"}
    assert all("DALI is not installed" in c["reason"] for c in report["checks"] if c["status"] == "skipped")
    assert report["complete"] is True and "0 failed" in proc.stdout
