"""Issue 20's defects outside the engine, as far as a CPU shows them: the precision `--amp auto` picks on old GPUs,
the benchmark clock's device, the commands' process-wide GPU settings, the emulated-bf16 note, quick sizes."""
import re

import pytest
import torch

import gfnet.precision as precision
from gfnet.device import gpu_settings

# ---------------------------------------------------------------------------------------- --amp auto (10)

@pytest.mark.parametrize("capability, expected", [((7, 5), "fp16"), ((6, 1), "fp16"), ((8, 0), "bf16"),
                                                  ((9, 0), "bf16")])
def test_amp_auto_takes_fp16_where_bf16_is_only_emulated(monkeypatch, capability, expected):
    # torch.cuda.is_bf16_supported() counts emulation (True on a T4 or a V100): no answer for what is fast
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert precision.default_amp("cuda:0") == expected
    assert precision.default_amp("cpu") == "bf16"


# -------------------------------------------------------------------------------- benchmark clock (9)

def test_benchmark_clock_waits_for_the_measured_device(monkeypatch):
    """gfnet-bench --device cuda:1 with cuda:0 current: every timed block must wait for cuda:1's kernels."""
    from gfnet.bench.common import measure
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    timings = measure({"noop": lambda: None}, min_run_time=0.0, rounds=2, device=torch.device("cuda", 1))
    assert timings["noop"].runs >= 2
    assert waited and all(d is not None and torch.device(d) == torch.device("cuda", 1) for d in waited)
    waited.clear()
    measure({"noop": lambda: None}, min_run_time=0.0, device=torch.device("cpu"))
    assert waited == []  # the CPU's clock waits for nothing


# ------------------------------------------------------------------------- process-wide GPU settings (11)

def _switches():
    return (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
            torch.backends.cudnn.benchmark)


@pytest.fixture
def restore_switches():
    saved = _switches()
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision, \
        torch.backends.cudnn.benchmark = saved


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch before 2.9")
def test_gpu_settings_are_set_for_the_run_and_restored(restore_switches):
    # the caller chose with torch's new API (after which reading the legacy allow_tf32 flags raises)
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cudnn.benchmark = False
    with gpu_settings(tf32=True, cudnn_benchmark=True):
        assert _switches() == ("tf32", "tf32", True)
    assert _switches() == ("ieee", "ieee", False)
    with gpu_settings(tf32=None, cudnn_benchmark=None):  # leave the caller's choice
        assert _switches() == ("ieee", "ieee", False)
    with pytest.raises(RuntimeError, match="boom"), gpu_settings(tf32=False):
        torch.backends.cuda.matmul.fp32_precision = "tf32"  # whatever the run did, the exit restores
        raise RuntimeError("boom")
    assert _switches() == ("ieee", "ieee", False)


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch before 2.9")
@pytest.mark.parametrize("extra, expected", [((), "ieee"), (("--tf32",), "tf32")])
def test_gfnet_eval_is_full_fp32_unless_asked(monkeypatch, tmp_path, restore_switches, extra, expected):
    import gfnet.cli.eval as cli
    seen = []
    monkeypatch.setattr(cli, "evaluate_checkpoint", lambda *a, **k: seen.append(_switches()))
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "none"
    torch.backends.cudnn.benchmark = False
    assert cli.main(["--checkpoint", str(tmp_path / "c.pth.tar"), "--eval-mode", "1", "--data", str(tmp_path),
                     *extra]) == 0
    assert seen == [(expected, expected, True)]
    assert _switches() == ("none", "none", False)  # the caller's settings, back after the command


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch before 2.9")
@pytest.mark.parametrize("extra, expected", [((), "tf32"), (("--no-tf32",), "ieee")])
def test_gfnet_train_offers_full_fp32(monkeypatch, tmp_path, restore_switches, extra, expected):
    import gfnet.train
    from gfnet.cli.train import main
    seen = []
    monkeypatch.setattr(gfnet.train, "train_imagefolder", lambda *a, **k: seen.append(_switches()) or [])
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "none"
    assert main(["--data", str(tmp_path), "--arch", "resnet10t", "--patch-size", "32", "--T", "3", "--stage", "1",
                 "--out", str(tmp_path / "run"), "--device", "cpu", "--no-progress", *extra]) == 0
    assert seen == [(expected, expected, True)]
    assert _switches()[:2] == ("none", "none")


def test_the_library_leaves_the_process_settings_alone(restore_switches):
    """Trainer and the engine never set cuDNN or TF32 switches: only the commands do, for their run."""
    from gfnet import build_model
    from gfnet.train import Trainer, TrainOptions
    torch.backends.cudnn.benchmark = False
    before = _switches()
    Trainer(build_model("resnet10t", patch_size=32, T=2, num_classes=4), TrainOptions(stage=1, epochs=1))
    assert _switches() == before


# ----------------------------------------------------------------------------- emulated bf16 note (13)

def test_bf16_slowdown_is_a_measurement(monkeypatch):
    """The factor is the ratio of the two timed calls, read off the clock (a fake one here)."""
    clock = [0.0]
    monkeypatch.setattr(precision.time, "perf_counter", lambda: clock[0])

    def run():  # 2 s in fp32, 11 s under bf16 autocast
        clock[0] += 11.0 if torch.is_autocast_enabled("cpu") else 2.0
    assert precision.measure_bf16_slowdown(run, repeats=3) == pytest.approx(5.5)


@pytest.fixture
def plain_cpu(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16_cpu_feature", lambda: None)


def _train(tmp_path, *extra):
    from gfnet.cli.train import main
    return main(["--data", str(tmp_path / "no_such_data"), "--arch", "resnet10t", "--patch-size", "32", "--T", "3",
                 "--stage", "1", "--out", str(tmp_path / "run"), "--device", "cpu", "--no-progress", *extra])


def _eval(tmp_path, *extra):
    from gfnet.cli.eval import main
    return main(["--checkpoint", str(tmp_path / "no_such.pth.tar"), "--eval-mode", "2", "--arch", "resnet10t",
                 "--patch-size", "32", "--data", str(tmp_path / "no_such_data"), *extra])


@pytest.mark.parametrize("command, option", [(_train, ("--amp", "bf16")), (_eval, ("--dtype", "bf16"))])
def test_emulated_bf16_is_said_once_with_the_measured_factor(plain_cpu, monkeypatch, tmp_path, capsys, command,
                                                             option):
    measured = []

    def fake_measure(run, repeats=2):  # the command's own workload is handed to the measurement
        run()
        measured.append(run)
        return 7.25
    monkeypatch.setattr(precision, "measure_bf16_slowdown", fake_measure)
    assert command(tmp_path, *option) != 0  # the missing input, reported after the note
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "emulates bf16" in line]
    assert len(notes) == 1 and len(measured) == 1
    assert "7.2x" in notes[0] and " ".join(option) in notes[0] and "resnet10t" in notes[0]
    assert err.index(notes[0]) < err.index("no_such")  # before the work (and its error)


@pytest.mark.parametrize("command, option", [(_train, ("--amp", "none")), (_eval, ("--dtype", "fp32")),
                                             (_train, ())])
def test_no_emulation_note_without_bf16(plain_cpu, tmp_path, capsys, command, option):
    assert command(tmp_path, *option) != 0
    assert "emulates bf16" not in capsys.readouterr().err


def test_no_emulation_note_on_a_cpu_with_bf16_units(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(precision, "native_bf16_cpu_feature", lambda: "amx")
    assert _train(tmp_path, "--amp", "bf16") != 0
    assert "emulates bf16" not in capsys.readouterr().err


def test_emulated_bf16_note_measures_for_real(plain_cpu, tmp_path, capsys):
    assert _eval(tmp_path, "--dtype", "bf16") != 0
    (note,) = [line for line in capsys.readouterr().err.splitlines() if "emulates bf16" in line]
    factor = float(re.search(r"took ([0-9.]+)x its fp32 time", note).group(1))
    assert factor > 0


# --------------------------------------------------------------------------------------- quick sizes

def test_quick_anytime_suite_keeps_quick_sizes_on_a_gpu():
    from gfnet.bench.bench_anytime import default_batch
    assert default_batch(torch.device("cuda", 0), quick=True) < 256
    assert default_batch(torch.device("cuda", 0), quick=False) == 256
    assert default_batch(torch.device("cpu"), quick=True) == 8
