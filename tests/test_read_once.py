"""Each checkpoint file is read once per run (issue 21): ``gfnet-train --resume auto`` loads
checkpoint.pth.tar once and model_best.pth.tar at most once, a run preempted in the middle of its epoch
resumes with one read of mid_epoch.pth.tar, and the run still resumes right (the counts are taken on real
runs of the command, with torch.load wrapped by a counter; the stop signal is a real SIGTERM)."""
import collections
import os
import signal

import pytest
import torch

from gfnet.cli.train import main
from gfnet.data.sample import make_sample_tree

pytestmark = pytest.mark.usefixtures("one_thread")

CKPT, BEST, MID = "checkpoint.pth.tar", "model_best.pth.tar", "mid_epoch.pth.tar"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("read_once") / "data"
    make_sample_tree(str(root), num_classes=2, train_per_class=4, val_per_class=2, photo_size=(48, 40))
    return str(root)


def args(data, out, *extra):
    return ["--data", data, "--arch", "test_efficientnet", "--patch-size", "16", "--T", "2", "--batch-size", "2",
            "--backend", "torchvision", "--workers", "0", "--no-progress", "--device", "cpu", "--stage", "1",
            "--train-global", "yes", "--out", str(out), *extra]


@pytest.fixture
def loads(monkeypatch):
    """{file name: torch.load calls on it} while the test runs."""
    counts = collections.Counter()
    real = torch.load

    def counting(f, *a, **kw):
        if isinstance(f, (str, os.PathLike)):
            counts[os.path.basename(os.fspath(f))] += 1
        return real(f, *a, **kw)

    monkeypatch.setattr(torch, "load", counting)
    return counts


def test_resume_auto_reads_each_file_once(data, tmp_path, loads):
    out = tmp_path / "run"
    assert main(args(data, out, "--epochs", "1")) == 0
    assert os.path.exists(out / CKPT) and os.path.exists(out / BEST)
    loads.clear()
    assert main(args(data, out, "--epochs", "2", "--resume", "auto")) == 0
    assert loads[CKPT] == 1, dict(loads)
    assert loads[BEST] <= 1, dict(loads)
    assert torch.load(str(out / CKPT), weights_only=True)["epoch"] == 2  # it resumed, and trained on


def test_mid_epoch_resume_reads_the_state_once(data, tmp_path, loads, monkeypatch):
    from gfnet.train.trainer import Trainer

    out = tmp_path / "run"
    real_step = Trainer.train_step

    def step_then_signal(self, images, labels):
        result = real_step(self, images, labels)
        if self.global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's stop signal, caught by the run's handler
        return result

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    assert main(args(data, out, "--epochs", "1")) == 128 + signal.SIGTERM
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert os.path.exists(out / MID) and not os.path.exists(out / CKPT)
    loads.clear()
    assert main(args(data, out, "--epochs", "1", "--resume", "auto")) == 0
    assert loads[MID] == 1, dict(loads)
    state = torch.load(str(out / CKPT), weights_only=True)
    assert state["epoch"] == 1 and state["train_state"]["global_step"] == 4  # 8 images, batch 2


# ---------------------------------------------------------------------------- the record, net.meta, the writer
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sources(folder):
    for base, _, files in os.walk(os.path.join(ROOT, folder)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(base, name)
                with open(path) as fh:
                    yield os.path.relpath(path, ROOT), fh.read()


def test_differences_names_every_mismatch_at_once(tmp_path):
    import gfnet
    from gfnet.checkpoint import read_record

    torch.manual_seed(0)
    net = gfnet.build_model("test_efficientnet", patch_size=16, T=3, num_classes=4)
    gfnet.save_checkpoint(net, str(tmp_path / "c.pth.tar"), train_state={"stage": 1, "options": {"stage": 1}})
    record = read_record(str(tmp_path / "c.pth.tar"))
    assert record.differences(arch="test_efficientnet", patch_size=16, T=3, classifier="cascade", num_classes=4,
                              options={"stage": 1}) == []
    found = record.differences(arch="test_resnet", patch_size=32, T=2, classifier="gru", num_classes=5,
                               options={"stage": 2, "train_global": True})  # not stored: not compared
    assert [d.split(" ")[0] for d in found] == ["architecture", "patch", "T", "classifier", "classes", "stage"]
    assert "test_efficientnet (checkpoint) vs test_resnet (this run)" in found[0]


def test_meta_is_typed_and_round_trips(tmp_path):
    import gfnet
    from gfnet.models.meta import ModelMeta

    torch.manual_seed(0)
    net = gfnet.build_model("test_efficientnet", patch_size=16, T=2, num_classes=3)
    assert isinstance(net.meta, ModelMeta) and net.meta.classes is None
    net.meta.classes = ["a", "b", "c"]
    net.meta.anytime_classification = [40.0, 50.0]
    gfnet.save_checkpoint(net, str(tmp_path / "c.pth.tar"), note="kept")
    loaded = gfnet.load_checkpoint(str(tmp_path / "c.pth.tar"))
    meta = loaded.meta
    assert meta.classes == ["a", "b", "c"] and meta.anytime_classification == [40.0, 50.0]
    assert meta.source_origin == "gfnet" and meta.layout == "release" and len(meta.flops) == 2
    assert meta.extras == {"note": "kept"}  # a field of the file that has no name of its own
    assert meta.get("classes") == ["a", "b", "c"] and meta["note"] == "kept"  # the deprecated dict reads
    with pytest.raises(KeyError):
        meta["dynamic_threshold"]


def test_no_string_indexing_of_net_meta_outside_the_checkpoint_module():
    offenders = [path for path, text in sources("gfnet")
                 if not path.startswith(("gfnet/checkpoint", "gfnet/models/meta.py"))
                 and any(s in text for s in ("net.meta[", "net.meta.get(", "net.meta.update(", "net.meta.pop("))]
    assert not offenders, offenders


def test_one_atomic_writer():
    """Files are replaced only by gfnet.atomic (the run folder's renames move a run's own files aside and back;
    the exporter renames a whole package folder into place, each file in it checksummed)."""
    allowed = {"gfnet/atomic.py", "gfnet/train/run_folder.py", "gfnet/deploy/exporter.py"}
    offenders = [path for folder in ("gfnet", "bench") for path, text in sources(folder)
                 if path not in allowed and ("os.replace(" in text or "os.rename(" in text or "mkstemp(" in text
                                             and "write-probe" not in text)]
    assert not offenders, offenders


def test_gfnet_eval_write_reads_its_checkpoint_once(data, tmp_path, loads):
    """gfnet-eval --eval-mode 2 --write: the summary, the network and the file it rewrites come from one read."""
    from gfnet.cli.eval import main as eval_main

    out = tmp_path / "run"
    assert main(args(data, out, "--epochs", "1")) == 0
    before = torch.load(str(out / CKPT), weights_only=True)
    loads.clear()
    assert eval_main(["--checkpoint", str(out / CKPT), "--eval-mode", "2", "--data", data, "--backend", "torchvision",
                      "--batch-size", "2", "--write", "--train-subset", "8"]) == 0
    assert loads[CKPT] == 1, dict(loads)
    stored = torch.load(str(out / CKPT), weights_only=True)
    assert stored["dynamic_threshold"] is not None and stored["anytime_classification"] is not None
    assert stored["train_state"]["history"] == before["train_state"]["history"]  # the whole checkpoint, rewritten
    assert stored["train_state"].keys() == before["train_state"].keys()
    for part in ("model_state_dict", "model_prime_state_dict", "fc", "policy"):
        assert all(torch.equal(v, before[part][k]) for k, v in stored[part].items()), part
