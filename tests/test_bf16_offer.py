"""bf16 is offered, never forced: the CPU probe, the one-line note of gfnet-train and gfnet-eval when the user
named no precision on a CPU with native bf16 units, and its absence otherwise."""
import pytest
import torch

import gfnet.precision as precision
from gfnet.precision import bf16_offer, native_bf16_cpu_feature


@pytest.fixture
def bf16_cpu(monkeypatch):
    """A CPU with native bf16 units, whatever this machine has."""
    monkeypatch.setattr(precision, "native_bf16_cpu_feature", lambda: "avx512_bf16")


@pytest.fixture
def plain_cpu(monkeypatch):
    """A CPU without native bf16 units, whatever this machine has."""
    monkeypatch.setattr(precision, "native_bf16_cpu_feature", lambda: None)


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(True, True, "amx"), (False, True, "avx512_bf16"),
                                                        (True, False, "amx"), (False, False, None)])
def test_native_bf16_feature_follows_torchs_probes(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert native_bf16_cpu_feature() == expected


def test_native_bf16_feature_on_a_torch_without_the_probes(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert native_bf16_cpu_feature() is None


def test_native_bf16_feature_matches_cpuinfo():
    """On Linux the kernel's flags say the same as torch's probes (amx_tile or avx512_bf16)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        flags = None
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags here")
    expected = "amx" if "amx_tile" in flags else "avx512_bf16" if "avx512_bf16" in flags else None
    assert native_bf16_cpu_feature() == expected


@pytest.fixture
def results(tmp_path, monkeypatch):
    """A results folder of our own (the offer reads its figures from there at run time), empty at first."""
    monkeypatch.setattr(precision, "_results_dir", lambda: str(tmp_path))
    return tmp_path


def _write_results(folder):
    import json
    rows = [{"provider": p, "median_s": t, "case": "resnet50 S=224 P=96 T=5"} for p, t in (
        ("gfnet (fp32, channels-last)", 0.6), ("gfnet (bf16 autocast, channels-last)", 0.25),
        ("gfnet compiled (fp32, channels-last)", 0.5), ("gfnet compiled (bf16 autocast, channels-last)", 0.4))]
    (folder / precision.BF16_SPEED_FILE).write_text(json.dumps({"env": {"device_name": "Test CPU"}, "rows": rows}))
    runs = [{"train_and_eval": k, "anytime_accuracy_learned": [10.0, 20.0, a]}
            for k, a in (("fp32", 70.0), ("fp32", 80.0), ("bf16 autocast", 60.0))]
    (folder / precision.BF16_ACCURACY_FILE).write_text(json.dumps({"git": "abc1234", "runs": runs}))


@pytest.mark.parametrize("amp", ["auto", None])
def test_offer_when_no_precision_was_chosen_on_a_bf16_cpu(bf16_cpu, results, amp):
    line = bf16_offer("cpu", amp)
    assert line is not None and "\n" not in line
    assert "avx512_bf16" in line and "--amp bf16" in line
    assert "--dtype bf16" in bf16_offer(None, amp, option="--dtype bf16")
    assert "measured" not in line  # no results files: no figures, and still the offer
    # the figures are read from the results files when the offer is made: a rerun benchmark is what is quoted
    _write_results(results)
    line = bf16_offer("cpu", amp)
    assert "2.40x eager, 1.25x compiled over fp32" in line and "Test CPU" in line
    assert "fp32 75.0% (2 runs), bf16 autocast 60.0% (1 run)" in line and "git abc1234" in line
    (results / precision.BF16_SPEED_FILE).write_text("{not json")
    line = bf16_offer("cpu", amp)
    assert "eager" not in line and "fp32 75.0%" in line  # an unreadable file is left out, not fatal


def test_the_offer_finds_this_checkouts_results_folder():
    import os
    folder = precision._results_dir()
    assert folder is not None and os.path.samefile(folder, os.path.join(os.path.dirname(__file__), "..", "bench",
                                                                        "results"))


@pytest.mark.parametrize("amp", ["none", "fp32", "bf16", "fp16"])
def test_no_offer_when_the_user_chose(bf16_cpu, amp):
    assert bf16_offer("cpu", amp) is None


def test_no_offer_without_bf16_units_or_off_the_cpu(plain_cpu, monkeypatch):
    assert bf16_offer("cpu", "auto") is None
    monkeypatch.setattr(precision, "native_bf16_cpu_feature", lambda: "amx")
    assert bf16_offer(torch.device("cuda", 0), "auto") is None
    assert bf16_offer("cpu", "auto") is not None


# The commands: the note comes before any work (here the missing data folder stops the run right after it).
def _train(tmp_path, *extra):
    from gfnet.cli.train import main

    return main(["--data", str(tmp_path / "no_such_data"), "--arch", "resnet50", "--patch-size", "96", "--T", "5",
                 "--stage", "1", "--out", str(tmp_path / "run"), "--device", "cpu", "--no-progress", *extra])


def _eval(tmp_path, *extra):
    from gfnet.cli.eval import main

    return main(["--checkpoint", str(tmp_path / "no_such.pth.tar"), "--eval-mode", "2",
                 "--data", str(tmp_path / "no_such_data"), *extra])


@pytest.mark.parametrize("command, option", [(_train, "--amp bf16"), (_eval, "--dtype bf16")])
def test_commands_print_the_offer_once_by_default(bf16_cpu, tmp_path, capsys, command, option):
    assert command(tmp_path) != 0  # the missing input, reported after the note
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "native bf16 units" in line]
    assert len(notes) == 1 and option in notes[0]
    assert "no_such" in err  # the real error still follows


@pytest.mark.parametrize("command, choice", [(_train, ("--amp", "none")), (_train, ("--amp", "bf16")),
                                             (_eval, ("--dtype", "fp32")), (_eval, ("--dtype", "bf16"))])
def test_commands_stay_silent_when_the_user_chose(bf16_cpu, tmp_path, capsys, command, choice):
    assert command(tmp_path, *choice) != 0
    assert "native bf16 units" not in capsys.readouterr().err


@pytest.mark.parametrize("command", [_train, _eval])
def test_commands_stay_silent_without_bf16_units(plain_cpu, tmp_path, capsys, command):
    assert command(tmp_path) != 0
    assert "native bf16 units" not in capsys.readouterr().err


def test_eval_mode_0_computes_nothing_and_offers_nothing(bf16_cpu, tmp_path, capsys):
    from gfnet.cli.eval import main

    assert main(["--checkpoint", str(tmp_path / "no_such.pth.tar"), "--eval-mode", "0"]) != 0
    assert "native bf16 units" not in capsys.readouterr().err
