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


@pytest.mark.parametrize("amp", ["auto", None])
def test_offer_when_no_precision_was_chosen_on_a_bf16_cpu(bf16_cpu, amp):
    line = bf16_offer("cpu", amp)
    assert line is not None and "\n" not in line
    assert "avx512_bf16" in line and "--amp bf16" in line
    # it quotes measured numbers, with the files that hold them
    assert "bench/results/anytime_compile_cpu.md" in line and "bench/results/demo_bf16_cpu.md" in line
    assert "1.93x" in line and "2.22x" in line
    assert "--dtype bf16" in bf16_offer(None, amp, option="--dtype bf16")


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


def test_offer_quotes_the_measurement_files(bf16_cpu):
    """The numbers in the note are those of the files it names (a rerun that changes them must update it)."""
    import json
    import pathlib

    results = pathlib.Path(__file__).resolve().parents[1] / "bench" / "results"
    line = bf16_offer("cpu", "auto")
    demo = json.loads((results / "demo_bf16_cpu.json").read_text())["summary"]["step3_mean_5_seeds"]
    for key in ("fp32_fp32", "fp32_train_bf16_eval", "bf16_bf16"):
        assert f"{demo[key]:.1f}%" in line
    anytime = (results / "anytime_compile_cpu.md").read_text()
    for row, ratio in (("| gfnet (bf16 autocast, channels-last) |", "1.93x"),
                       ("| gfnet compiled (bf16 autocast, channels-last) |", "2.22x")):
        assert any(row in r and f"| {ratio} |" in r for r in anytime.splitlines()) and ratio in line
