"""Faults injected for real: killed training runs, a locked and a taken run folder, a diverging loss, an
empty training split, read-only and full file systems, corrupt files and impossible arguments.

Training runs that get killed run as subprocesses (tests/fault_runner.py) and die by SIGKILL at chosen
moments of a save. Tiny models and data (timm's test_efficientnet, 40x40 images) keep the file fast.
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid

import pytest
import torch

import gfnet
from gfnet.checkpoint import atomic_save, remove_stale_temps
from gfnet.train import TensorLoader, Trainer, TrainOptions
from gfnet.train.run_folder import LOCK_NAME, RunFolderBusy
from gfnet.train.trainer import TrainingError

HERE = os.path.dirname(os.path.abspath(__file__))
RUNNER = os.path.join(HERE, "fault_runner.py")
sys.path.insert(0, HERE)
from fault_runner import BATCH, CLASSES, P, T, learnable_task  # noqa: E402

CKPT, BEST = "checkpoint.pth.tar", "model_best.pth.tar"


pytestmark = pytest.mark.usefixtures("one_thread")


def run_training(cfg: dict, expect_kill: bool = False) -> list:
    """Run tests/fault_runner.py with ``cfg``; the per-epoch history it printed (None when killed)."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, RUNNER, json.dumps(cfg)], capture_output=True, text=True, env=env,
                          timeout=300)
    if expect_kill:
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])
        return None
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def state_of(path: str) -> dict:
    return gfnet.load_checkpoint(path).state_dict()


def epoch_of(path: str) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def temps(folder) -> list:
    return sorted(n for n in os.listdir(folder) if n.endswith(".gfnet-tmp"))


def tiny_net(seed=0, T_=T, classifier=None):
    torch.manual_seed(seed)
    return gfnet.build_model("test_efficientnet", patch_size=P, T=T_, num_classes=CLASSES, classifier=classifier)


def task_loader(seed=0):
    images, labels = learnable_task()
    return TensorLoader(images, labels, BATCH, train=True, seed=seed)


def options(**kw):
    base = dict(stage=1, epochs=2, backbone_lr=0.05, fc_lr=0.05, train_global=True, progress=False, batch_size=BATCH)
    base.update(kw)
    return TrainOptions(**base)


# ---------------------------------------------------------------- kills at any moment of a save
def improving_epochs(accs: list) -> list:
    """The epochs (1-based) whose accuracy beats every earlier one: those that write model_best."""
    return [e for e in range(1, len(accs) + 1) if accs[e - 1] > max([0.0] + accs[:e - 1])]


def kill_points(accs: list) -> tuple:
    """(a, b, c) for the test below, taken from a run's own accuracies (another CPU's float rounding trains
    the task along another trajectory): a < b improving epochs after the first (a kill while the best
    file of a is written, then between the best file and the checkpoint of b) and c > b an epoch that does
    not improve (a kill while its checkpoint is written)."""
    improving = improving_epochs(accs)
    for a in improving[1:]:  # an improving epoch before a: the folder holds a best file when a is killed
        for b in (e for e in improving if e > a):
            for c in (e for e in range(b + 1, len(accs) + 1) if e not in improving):
                return a, b, c
    raise AssertionError(f"the straight run's accuracies {accs} hold no two improving epochs after the first "
                         "followed by one that does not improve: the task no longer trains as this test needs")


def test_best_model_survives_kills_at_every_point_of_a_save(tmp_path):
    """Kill a run while it writes the best file, between the best file and the checkpoint, and while it
    writes the checkpoint; after each kill model_best holds the best finished epoch, the next run cleans
    the temporary file up and resumes, and the end result is bit-identical to an uninterrupted run. The
    epochs of the kills come from the uninterrupted run's own accuracies."""
    epochs = 6
    straight = run_training({"mode": "tensor", "out": str(tmp_path / "straight"), "epochs": epochs,
                             "dump": str(tmp_path / "dump")})
    accs = [r["acc"] for r in straight]
    a, b, c = kill_points(accs)
    improving = improving_epochs(accs)

    def best_until(epoch):  # the epoch model_best holds once `epoch` epochs are finished
        return max(e for e in improving if e <= epoch)

    dumped = {e: torch.load(tmp_path / "dump" / f"epoch{e}.pt", weights_only=True) for e in range(1, epochs + 1)}
    out = tmp_path / "killed"
    cfg = {"mode": "tensor", "out": str(out), "epochs": epochs}

    def check_best():
        finished = max(epoch_of(out / CKPT), epoch_of(out / BEST))
        expect = max(range(1, finished + 1), key=lambda e: (accs[e - 1], -e))
        assert epoch_of(out / BEST) == expect == best_until(finished), accs
        assert same_weights(state_of(out / BEST), dumped[expect])

    # 1. while writing the best file of epoch a: the folder stays as after epoch a - 1, plus a temporary file
    run_training({**cfg, "kill": {"file": BEST, "epoch": a, "phase": "during"}}, expect_kill=True)
    assert (epoch_of(out / CKPT), epoch_of(out / BEST)) == (a - 1, best_until(a - 1)) and len(temps(out)) == 1
    check_best()
    # 2. resumed (auto), killed between the best file and the checkpoint of epoch b
    run_training({**cfg, "resume": "auto", "kill": {"file": BEST, "epoch": b, "phase": "after"}},
                 expect_kill=True)
    assert temps(out) == []  # the first kill's temporary file was removed
    assert (epoch_of(out / CKPT), epoch_of(out / BEST)) == (b - 1, b)
    check_best()
    from gfnet.train.run_folder import RunFolder

    assert RunFolder(str(out)).resolve_resume("auto") == str(out / BEST)  # auto takes the newer state
    # 3. resumed from the older checkpoint by path (it adopts the newer best file), killed while writing
    #    the checkpoint of epoch c (not an improving epoch)
    run_training({**cfg, "resume": str(out / CKPT), "kill": {"file": CKPT, "epoch": c, "phase": "during"}},
                 expect_kill=True)
    assert (epoch_of(out / CKPT), epoch_of(out / BEST)) == (c - 1, best_until(c - 1)) and len(temps(out)) == 1
    check_best()
    # 4. resumed to the end
    final = run_training({**cfg, "resume": "auto"})
    assert [r["acc"] for r in final] == accs
    assert temps(out) == []
    assert same_weights(state_of(out / CKPT), dumped[epochs])
    assert same_weights(state_of(out / CKPT), state_of(tmp_path / "straight" / CKPT))
    assert same_weights(state_of(out / BEST), state_of(tmp_path / "straight" / BEST))
    best = torch.load(out / BEST, weights_only=True)
    assert best["train_state"]["best_epoch"] == best["epoch"] == best_until(epochs)


@pytest.mark.parametrize("workers", [2])
def test_torchvision_backend_resumes_exactly_with_workers(tmp_path, workers):
    """An interrupted (SIGKILL after epoch 1's checkpoint) and resumed run on the torchvision backend with
    worker processes ends with the weights of the uninterrupted run, bit for bit."""
    from gfnet.data import make_sample_tree

    data = tmp_path / "data"
    make_sample_tree(str(data), num_classes=2, train_per_class=8, val_per_class=1, photo_size=(56, 44))
    cfg = {"mode": "folder", "data": str(data), "epochs": 3, "workers": workers, "lr": 0.05}
    run_training({**cfg, "out": str(tmp_path / "straight")})
    run_training({**cfg, "out": str(tmp_path / "resumed"), "kill": {"file": CKPT, "epoch": 1, "phase": "after"}},
                 expect_kill=True)
    run_training({**cfg, "out": str(tmp_path / "resumed"), "resume": "auto"})
    a, b = state_of(tmp_path / "straight" / CKPT), state_of(tmp_path / "resumed" / CKPT)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert differ == [], f"{len(differ)} tensors differ, e.g. {differ[:3]}"


# ---------------------------------------------------------------- one run per folder
def test_a_folder_holding_a_run_is_refused_without_resume_or_overwrite(tmp_path):
    out = str(tmp_path / "run")
    first = Trainer(tiny_net(), options(epochs=1), out_dir=out)
    first.fit(task_loader())
    before = open(os.path.join(out, CKPT), "rb").read()
    with pytest.raises(ValueError, match="already holds a training run.*--resume auto.*--overwrite"):
        Trainer(tiny_net(1), options(epochs=1), out_dir=out).fit(task_loader())
    assert open(os.path.join(out, CKPT), "rb").read() == before
    # another run's checkpoint resumed into this folder is refused as well
    other = str(tmp_path / "other")
    Trainer(tiny_net(), options(epochs=1, seed=5), out_dir=other).fit(task_loader())
    with pytest.raises(ValueError, match="holds another training run"):
        Trainer(tiny_net(), options(epochs=2, seed=5), out_dir=out).fit(task_loader(),
                                                                        resume=os.path.join(other, CKPT))
    # --resume auto continues it; --overwrite replaces it (the old best file goes too)
    cont = Trainer(tiny_net(), options(epochs=2), out_dir=out)
    cont.fit(task_loader(), resume="auto")
    assert cont.epoch == 2 and cont.run_id == first.run_id
    fresh = Trainer(tiny_net(1), options(epochs=1), out_dir=out, overwrite=True)
    fresh.fit(task_loader())
    stored = torch.load(os.path.join(out, CKPT), weights_only=True)
    assert stored["epoch"] == 1 and stored["train_state"]["run_id"] == fresh.run_id != first.run_id
    # --resume auto on an empty folder starts fresh
    empty = Trainer(tiny_net(), options(epochs=1), out_dir=str(tmp_path / "new"))
    empty.fit(task_loader(), resume="auto")
    assert empty.epoch == 1


def test_second_process_is_locked_out_until_the_first_dies(tmp_path):
    out = tmp_path / "run"
    os.makedirs(out)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from gfnet.train.run_folder import RunFolder; "
                               f"RunFolder({str(out)!r}).acquire(); print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderBusy, match=f"in use by another training run \\(pid {holder.pid} "):
            Trainer(tiny_net(), options(epochs=1), out_dir=str(out)).fit(task_loader())
        assert not os.path.exists(out / CKPT)
    finally:
        holder.kill()  # SIGKILL: the holder never releases the lock itself
        holder.wait()
    trainer = Trainer(tiny_net(), options(epochs=1), out_dir=str(out))
    trainer.fit(task_loader(), resume="auto")  # the OS released the dead holder's lock
    assert trainer.epoch == 1 and os.path.exists(out / LOCK_NAME)


def test_stale_temporary_files_only_gfnets_own(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from gfnet.checkpoint import _host_tag

    host = _host_tag()
    names = {
        f".checkpoint.pth.tar.{host}-{dead.pid}.abc123_x.gfnet-tmp": False,  # a killed save: removed
        f".checkpoint.pth.tar.{host}-{os.getpid()}.abc123_y.gfnet-tmp": True,  # a live writer's: kept
        f".checkpoint.pth.tar.otherhost-{dead.pid}.abc123_z.gfnet-tmp": True,  # another host's: kept
        ".tmp-notes.txt": True, "my.gfnet-tmp.bak": True, "checkpoint.pth.tar.bak": True,  # user files
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    atomic_save({"a": torch.zeros(2)}, str(tmp_path / "model.pth.tar"))
    left = set(os.listdir(tmp_path))
    for name, kept in names.items():
        assert (name in left) == kept, name
    assert remove_stale_temps(str(tmp_path)) == []


# ---------------------------------------------------------------- what a training run stops on
class _PoisonedLoader:
    """Good batches in epoch 0, a batch with NaN pixels in epoch 1 (as a broken float dataset gives)."""

    def __init__(self):
        images, self.labels = learnable_task()
        self.images = (images.float() - 128.0) / 64.0
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.labels) // BATCH

    def __iter__(self):
        for i in range(len(self)):
            x = self.images[i * BATCH:(i + 1) * BATCH].clone()
            if self.epoch == 1 and i == 1:
                x[0, 0, 0, 0] = float("nan")
            yield x, self.labels[i * BATCH:(i + 1) * BATCH]


def test_non_finite_loss_stops_and_saves_nothing_as_best(tmp_path):
    out = str(tmp_path / "run")
    trainer = Trainer(tiny_net(), options(epochs=3, log_every=1), out_dir=out)
    with pytest.raises(TrainingError, match=r"diverged in epoch 2: the loss is nan.*epoch 1\) stays in"):
        trainer.fit(_PoisonedLoader())
    for name in (CKPT, BEST):
        stored = torch.load(os.path.join(out, name), weights_only=True)
        assert stored["epoch"] == 1
        assert all(torch.isfinite(v).all() for v in stored["model_state_dict"].values() if v.is_floating_point())
    # a learning rate that blows the weights up: no checkpoint at all
    blown = Trainer(tiny_net(), options(epochs=1, backbone_lr=1e30, fc_lr=1e30), out_dir=str(tmp_path / "b"))
    with pytest.raises(TrainingError, match="diverged in epoch 1.*no checkpoint was written"):
        blown.fit(task_loader())
    assert not os.path.exists(tmp_path / "b" / CKPT) and not os.path.exists(tmp_path / "b" / BEST)
    with pytest.raises(ValueError, match="backbone_lr must be a finite number"):
        Trainer(tiny_net(), options(backbone_lr=float("nan")))


def test_split_smaller_than_the_batch_stops_before_training(tmp_path, capsys):
    from gfnet.cli.train import main
    from gfnet.data import make_sample_tree

    data = tmp_path / "data"
    make_sample_tree(str(data), num_classes=2, train_per_class=2, val_per_class=1, photo_size=(48, 40))
    out = tmp_path / "run"
    args = ["--data", str(data), "--arch", "test_efficientnet", "--patch-size", "16", "--T", "2", "--stage", "1",
            "--batch-size", "8", "--epochs", "1", "--backend", "torchvision", "--workers", "0", "--no-progress",
            "--device", "cpu", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("gfnet-train: error: the training loader yields no batch: 4 valid training images "
                          "make no full batch of 8"), err
    assert not os.path.exists(out / CKPT)


# ---------------------------------------------------------------- resuming a changed run
def test_resume_refuses_a_changed_model_and_reports_changed_options(tmp_path, caplog):
    out = str(tmp_path / "run")
    Trainer(tiny_net(), options(epochs=1, seed=3), out_dir=out).fit(task_loader(3))
    ckpt = os.path.join(out, CKPT)
    for net, match in ((tiny_net(T_=2), "T 3 \\(checkpoint\\) vs 2"),
                       (tiny_net(classifier="gru"), "classifier cascade \\(checkpoint\\) vs gru"),
                       (gfnet.build_model("test_efficientnet", patch_size=8, T=T, num_classes=CLASSES),
                        "patch size 16 \\(checkpoint\\) vs 8"),
                       (gfnet.build_model("test_resnet", patch_size=P, T=T, num_classes=CLASSES),
                        "architecture test_efficientnet \\(checkpoint\\) vs test_resnet")):
        with pytest.raises(ValueError, match=match):
            Trainer(net, options(epochs=2, seed=3), out_dir=out).fit(task_loader(3), resume=ckpt)
    with pytest.raises(ValueError, match="stage 1 \\(checkpoint\\) vs 3"):
        Trainer(tiny_net(), options(stage=3, epochs=2), out_dir=out).fit(task_loader(3), resume=ckpt)
    caplog.set_level("WARNING", logger="gfnet.train")
    resumed = Trainer(tiny_net(), options(epochs=3, seed=4, backbone_lr=0.01, batch_size=16), out_dir=out)
    resumed.fit(task_loader(4), resume="auto")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resume: ")]
    assert sorted(lines) == sorted([
        "resume: epochs changes from 1 to 3 (from epoch 2 on)", "resume: seed changes from 3 to 4 (from epoch 2 on)",
        "resume: backbone_lr changes from 0.05 to 0.01 (from epoch 2 on)",
        "resume: batch_size changes from 8 to 16 (from epoch 2 on)"])
    stored = torch.load(ckpt, weights_only=True)
    state = stored["train_state"]
    assert state["options"]["backbone_lr"] == 0.01 and state["options"]["epochs"] == 3 and stored["epoch"] == 3
    groups = {g["name"]: g for g in stored["optimizer"]["param_groups"]}
    assert groups["model"]["base_lr"] == groups["model_prime"]["base_lr"] == 0.01  # not the old 0.05
    assert groups["fc"]["base_lr"] == 0.05
    assert [r["lr"]["model"] for r in state["history"][1:]] == pytest.approx(
        [0.5 * 0.01 * (1 + __import__("math").cos(__import__("math").pi * e / 3)) for e in (1, 2)])
    assert {c["option"] for c in state["changes"]} == {"epochs", "seed", "backbone_lr", "batch_size"}


# ---------------------------------------------------------------- commands: one line, the right status
@contextlib.contextmanager
def read_only_dir(path):
    """``path`` made read-only for real: a read-only bind mount as root, else chmod 0555."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        try:
            yield
        finally:
            os.chmod(path, 0o755)
        return
    if subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a read-only mount here")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a read-only mount here")
        yield
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


@contextlib.contextmanager
def tiny_filesystem(path, size="96k"):
    """A real, nearly empty file system of ``size`` at ``path`` (tmpfs; needs root)."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from gfnet.data import make_sample_tree

    root = tmp_path_factory.mktemp("cli")
    make_sample_tree(str(root / "data"), num_classes=2, train_per_class=4, val_per_class=2, photo_size=(48, 40))
    torch.manual_seed(0)
    net = gfnet.build_model("test_efficientnet", patch_size=16, T=2, num_classes=2)
    gfnet.save_checkpoint(net, str(root / "net.pth.tar"))
    (root / "corrupt.pth.tar").write_bytes(b"PK\x03\x04 this is no zip, no pickle")
    torch.save({"conv.weight": torch.zeros(1)}, root / "plain.pth")
    return root


def train_args(sample, out, *extra):
    return ["--data", str(sample / "data"), "--arch", "test_efficientnet", "--patch-size", "16", "--T", "2",
            "--stage", "1", "--batch-size", "4", "--epochs", "1", "--backend", "torchvision", "--workers", "0",
            "--no-progress", "--device", "cpu", "--out", str(out), *extra]


def one_line_error(capsys, prog):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    # argparse names a sub-command too: "gfnet-data make-sample: error: ..."
    errors = [line for line in err if line.startswith(prog) and ": error: " in line]
    assert errors, err
    assert not any(line.startswith("Traceback") for line in err), err
    return errors[-1]


def test_train_errors_are_one_line(sample, tmp_path, capsys):
    from gfnet.cli.train import main

    cases = [
        (["--resume", str(sample / "corrupt.pth.tar")], 2,
         "corrupt.pth.tar is not a gfnet or reference GFNet checkpoint"),
        (["--resume", str(sample / "plain.pth")], 2, "plain.pth is not a gfnet or reference GFNet checkpoint"),
        (["--init-global", str(sample / "corrupt.pth.tar")], 2, "not a backbone state dict nor a gfnet or reference"),
        (["--device", "foo"], 2, "unknown device 'foo'"),
        (["--resume", "auto", "--overwrite"], 2, "give one of them"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], 2, "sees no CUDA GPU"))
    for extra, status, message in cases:
        assert main(train_args(sample, tmp_path / "r1", *extra)) == status, extra
        assert message in one_line_error(capsys, "gfnet-train"), extra
    args = train_args(sample, tmp_path / "r2")
    args[args.index("test_efficientnet")] = "vit_tiny_patch16_224"
    assert main(args) == 2
    assert "'vit_tiny_patch16_224' is no CNN that GFNet can use" in one_line_error(capsys, "gfnet-train")
    for flag, value in (("--epochs", "0"), ("--workers", "-1"), ("--batch-size", "0"), ("--lr", "nan"),
                        ("--T", "0")):
        args = train_args(sample, tmp_path / "r3")
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
        assert f"argument {flag}" in one_line_error(capsys, "gfnet-train")
    (tmp_path / "a_file").write_text("mine")
    assert main(train_args(sample, tmp_path / "a_file")) == 2
    assert "is a file, not a folder" in one_line_error(capsys, "gfnet-train")
    top = f"/gfnet-test-{uuid.uuid4().hex[:8]}"
    assert main(train_args(sample, f"{top}/x/run")) == 2
    assert "at the filesystem root" in one_line_error(capsys, "gfnet-train")
    assert not os.path.exists(top)
    # the run folder rules through the command
    assert main(train_args(sample, tmp_path / "r4")) == 0
    assert main(train_args(sample, tmp_path / "r4")) == 2
    assert "already holds a training run (stage 1, epoch 1 of 1" in one_line_error(capsys, "gfnet-train")
    assert main(train_args(sample, tmp_path / "r4", "--overwrite")) == 0
    assert main(train_args(sample, tmp_path / "r4", "--resume", "auto")) == 0  # finished: nothing to do
    with read_only_dir(tmp_path / "ro"):
        assert main(train_args(sample, tmp_path / "ro" / "run")) == 1
        assert "Read-only file system" in one_line_error(capsys, "gfnet-train") or os.geteuid() != 0


def test_full_disk_is_said_in_one_line_and_leaves_no_temporary_file(sample, tmp_path, capsys):
    from gfnet.cli.train import main

    full = tmp_path / "full"
    with tiny_filesystem(full):
        assert main(train_args(sample, full / "run")) == 1
        line = one_line_error(capsys, "gfnet-train")
        assert "No space left on device" in line and ".pth.tar: cannot write it" in line, line
        assert [n for n in os.listdir(full / "run") if "tmp" in n] == []


def test_eval_write_checks_first_and_keeps_links_and_permissions(sample, tmp_path, capsys, monkeypatch):
    from gfnet.cli.eval import main

    common = ["--eval-mode", "2", "--data", str(sample / "data"), "--backend", "torchvision", "--num-threads", "0",
              "--batch-size", "4", "--write"]
    target = tmp_path / "real.pth.tar"
    target.write_bytes((sample / "net.pth.tar").read_bytes())
    os.chmod(target, 0o600)
    link = tmp_path / "link.pth.tar"
    os.symlink("real.pth.tar", link)
    assert main(["--checkpoint", str(link)] + common) == 0
    assert os.path.islink(link) and os.readlink(link) == "real.pth.tar"
    assert oct(os.stat(target).st_mode & 0o777) == oct(0o600)
    assert torch.load(target, weights_only=True)["dynamic_threshold"] is not None
    capsys.readouterr()
    ro = tmp_path / "ro"
    os.makedirs(ro)
    (ro / "c.pth.tar").write_bytes((sample / "net.pth.tar").read_bytes())
    with read_only_dir(ro):
        assert main(["--checkpoint", str(ro / "c.pth.tar")] + common) == 1
        captured = capsys.readouterr()
        assert "fitting thresholds" not in captured.out  # refused before any work
        assert "gfnet-eval: error: " in captured.err and "not writable" in captured.err
    assert main(["--checkpoint", str(target), "--real-exit", "--real-exit-points", "40"] + common) == 2
    assert "--real-exit-points must be in 1..39, got [40]" in one_line_error(capsys, "gfnet-eval")
    for bad, message in ((sample / "corrupt.pth.tar", "is not a gfnet or reference GFNet checkpoint"),
                         (sample / "plain.pth", "is not a gfnet or reference GFNet checkpoint")):
        assert main(["--checkpoint", str(bad), "--eval-mode", "0"]) == 2
        assert message in one_line_error(capsys, "gfnet-eval")


def test_bench_checks_out_dir_and_device_before_running(tmp_path, capsys, monkeypatch):
    from gfnet.cli import bench

    def no_run(*args, **kwargs):
        raise AssertionError("the benchmark must not run")

    monkeypatch.setattr(bench, "run_suite", no_run)
    (tmp_path / "a_file").write_text("x")
    assert bench.main(["kernels", "--quick", "--device", "cpu", "--out-dir", str(tmp_path / "a_file")]) == 2
    assert "is a file, not a folder" in one_line_error(capsys, "gfnet-bench")
    assert bench.main(["kernels", "--device", "foo"]) == 2
    assert "unknown device 'foo'" in one_line_error(capsys, "gfnet-bench")
    assert bench.main(["kernels", "nosuch"]) == 2
    assert "unknown suite(s) 'nosuch'" in one_line_error(capsys, "gfnet-bench")
    with read_only_dir(tmp_path / "ro"):
        assert bench.main(["kernels", "--device", "cpu", "--out-dir", str(tmp_path / "ro" / "x")]) in (1, 2)
        one_line_error(capsys, "gfnet-bench")


def test_data_demo_viz_errors_are_one_line(sample, tmp_path, capsys):
    from gfnet.cli import data, demo, viz

    for argv in (["make-sample", str(tmp_path / "d"), "--classes", "0"],
                 ["make-sample", str(tmp_path / "d"), "--train-per-class", "-1"]):
        with pytest.raises(SystemExit) as e:
            data.main(argv)
        assert e.value.code == 2
        one_line_error(capsys, "gfnet-data")
    (tmp_path / "a_file").write_text("x")
    assert data.main(["make-sample", str(tmp_path / "a_file")]) == 2
    assert "is not a folder" in one_line_error(capsys, "gfnet-data")
    assert demo.main(["--out", str(tmp_path / "a_file"), "--quick", "--no-progress"]) == 2
    assert "is a file, not a folder" in one_line_error(capsys, "gfnet-demo")
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path / "dm"), "--threads", "-3"])
    one_line_error(capsys, "gfnet-demo")
    top = f"/gfnet-test-{uuid.uuid4().hex[:8]}"
    ckpt = str(sample / "net.pth.tar")
    assert viz.main(["--checkpoint", ckpt, "--images", str(sample / "data" / "val"), "--out", f"{top}/x.png"]) == 2
    assert "at the filesystem root" in one_line_error(capsys, "gfnet-viz")
    assert not os.path.exists(top)
    assert viz.main(["--checkpoint", ckpt, "--images", str(sample / "data" / "val"), "--out",
                     str(tmp_path / "v.png"), "--device", "foo"]) == 2
    assert "unknown device" in one_line_error(capsys, "gfnet-viz")
    assert viz.main(["--checkpoint", str(sample / "corrupt.pth.tar"), "--images", str(sample / "data" / "val"),
                     "--out", str(tmp_path / "v.png")]) == 2
    one_line_error(capsys, "gfnet-viz")
