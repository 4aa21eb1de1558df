"""Preemption and the run folder's lock, for real (issue 22).

- A scheduler's stop signal (SIGTERM, or SIGUSR1 where asked) in the middle of an epoch: the run finishes
  its step, saves ``mid_epoch.pth.tar``, exits with 128 + the signal's number, and ``--resume auto`` ends
  with the weights of an uninterrupted run, bit for bit (the CPU's kernels are deterministic), with the
  tensor loader, the torchvision backend's worker processes and DALI's CPU pipeline. Signals are real:
  sent by the test to a subprocess (its whole process group, as SLURM does) or by the process to itself.
  Under torchrun: tests/test_distributed.py.
- The lock of a run killed by SIGKILL is free at once, though its DataLoader workers outlive it; a lock
  that a dead run's leftover process still holds is reported as such, never as a live run.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import gfnet
from gfnet.train import TensorLoader, Trainer, TrainOptions
from gfnet.train.preemption import Preempted
from gfnet.train.run_folder import MID_EPOCH_NAME, RunFolder, RunFolderBusy, read_run_info

HERE = os.path.dirname(os.path.abspath(__file__))
RUNNER = os.path.join(HERE, "fault_runner.py")
sys.path.insert(0, HERE)
from fault_runner import BATCH, CLASSES, P, T, learnable_task  # noqa: E402

CKPT, BEST, MID = "checkpoint.pth.tar", "model_best.pth.tar", MID_EPOCH_NAME
STEPS = 4  # 32 images / batch 8 (tensor task); 16 images / batch 4 (the sample tree)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return gfnet.build_model("test_efficientnet", patch_size=P, T=T, num_classes=CLASSES)


def options(**kw):
    base = dict(stage=1, epochs=3, backbone_lr=0.05, fc_lr=0.05, train_global=True, progress=False, batch_size=BATCH)
    base.update(kw)
    return TrainOptions(**base)


def task_loader(batch=BATCH):
    images, labels = learnable_task()
    return TensorLoader(images, labels, batch, train=True)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_run(a_path, b_path):
    """Two finished runs' checkpoints: weights, optimiser state, step counter and per-epoch statistics equal."""
    a, b = load(a_path), load(b_path)
    assert a["epoch"] == b["epoch"]
    for field in ("model_state_dict", "model_prime_state_dict", "fc"):
        differ = [k for k in a[field] if not torch.equal(a[field][k], b[field][k])]
        assert differ == [], f"{field}: {len(differ)} tensors differ, e.g. {differ[:3]}"
    for k, v in a["optimizer"]["state"].items():
        for name, tensor in v.items():
            assert torch.equal(torch.as_tensor(tensor), torch.as_tensor(b["optimizer"]["state"][k][name]))
    sa, sb = a["train_state"], b["train_state"]
    assert sa["global_step"] == sb["global_step"]
    strip = ("seconds", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in strip} for r in sa["history"]] == \
        [{k: v for k, v in r.items() if k not in strip} for r in sb["history"]]


class SignalAt:
    """A loader that sends this process a real signal as it hands out batch ``at`` of epoch ``epoch`` (once).
    ``with_start``: pass ``set_epoch(epoch, start)`` on; else offer only ``set_epoch(epoch)`` (the trainer
    must then read and discard the batches before a resumed run's position)."""

    def __init__(self, loader, epoch=-1, at=-1, sig=signal.SIGTERM, with_start=True):
        self.loader, self.epoch, self.at, self.sig = loader, epoch, at, sig
        self.batch_size = loader.batch_size
        if not with_start:
            self.set_epoch = lambda epoch: loader.set_epoch(epoch)

    def set_epoch(self, epoch, start=0):
        self.loader.set_epoch(epoch, start)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader, start=self.loader.start):
            if (self.loader.epoch, i) == (self.epoch, self.at):
                self.at = -1
                os.kill(os.getpid(), self.sig)
            yield batch


# ---------------------------------------------------------------- the tensor loader, in this process
@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run's folder (one torch thread, as the tests' runs)."""
    out = tmp_path_factory.mktemp("straight")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(tiny_net(), options(), out_dir=str(out)).fit(task_loader())
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("sig, with_start", [(signal.SIGTERM, True), (signal.SIGUSR1, False)])
def test_a_stop_signal_mid_epoch_saves_and_the_resumed_run_equals_an_uninterrupted_one(straight, tmp_path, sig,
                                                                                       with_start):
    out = tmp_path / "run"
    before = signal.getsignal(sig)
    stopped = Trainer(tiny_net(), options(), out_dir=str(out), stop_signals=("TERM", "USR1"))
    with pytest.raises(Preempted) as e:
        stopped.fit(SignalAt(task_loader(), epoch=1, at=1, sig=sig))
    # the step that saw the signal finished: 2 of epoch 2's 4 steps
    assert (e.value.epoch, e.value.step, e.value.steps) == (1, 2, STEPS)
    assert e.value.exit_status == 128 + sig and e.value.path == str(out / MID)
    assert f"stopped by {sig.name} after step 2 of 4 of epoch 2" in str(e.value)
    assert signal.getsignal(sig) is not before  # a stopped run's process keeps ignoring them on its way out
    signal.signal(sig, before)
    mid = load(out / MID)
    assert mid["epoch"] == 1 and mid["train_state"]["global_step"] == STEPS + 2
    assert mid["train_state"]["mid_epoch"]["step"] == 2 and mid["train_state"]["mid_epoch"]["signal"] == sig.name
    # not a finished epoch: the epoch-boundary files stay epoch 1's, --resume auto takes the mid-epoch state
    assert load(out / CKPT)["epoch"] == load(out / BEST)["epoch"] == 1
    assert RunFolder(str(out)).resolve_resume("auto") == str(out / MID)
    # other initial weights: all come from the file
    resumed = Trainer(tiny_net(seed=7), options(), out_dir=str(out), stop_signals=("TERM", "USR1"))
    resumed.fit(SignalAt(task_loader(), with_start=with_start), resume="auto")
    assert signal.getsignal(sig) is before  # a run that ends puts the handlers back
    assert not os.path.exists(out / MID)  # superseded by epoch 2's checkpoint
    assert_same_run(straight / CKPT, out / CKPT)
    assert_same_run(straight / BEST, out / BEST)


def test_a_signal_at_the_last_step_of_an_epoch_stops_after_its_save(straight, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Preempted) as e:
        Trainer(tiny_net(), options(), out_dir=str(out), stop_signals=("TERM",)).fit(
            SignalAt(task_loader(), epoch=0, at=STEPS - 1))
    assert (e.value.epoch, e.value.step, e.value.path) == (1, None, str(out / CKPT))
    assert "stopped by SIGTERM after epoch 1" in str(e.value)
    assert not os.path.exists(out / MID) and load(out / CKPT)["epoch"] == 1
    Trainer(tiny_net(), options(), out_dir=str(out)).fit(task_loader(), resume="auto")
    assert_same_run(straight / CKPT, out / CKPT)


def test_a_mid_epoch_state_is_refused_by_another_data_plan_and_never_taken_for_a_finished_epoch(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Preempted):
        Trainer(tiny_net(), options(), out_dir=str(out), stop_signals=("TERM",)).fit(
            SignalAt(task_loader(), epoch=0, at=1))
    assert sorted(os.listdir(out)) == [".gfnet-run.lock", MID, "train.log"]  # no epoch finished: no best file
    with pytest.raises(ValueError, match=r"stopped epoch 1 after step 2, a position in its data plan, and this run "
                                         r"plans the epoch otherwise \(batches per epoch 4 then, 2 now; batch size "
                                         r"per process 8 then, 16 now\)"):
        Trainer(tiny_net(), options(), out_dir=str(out)).fit(task_loader(batch=16), resume="auto")
    # a new run in the folder is refused (it holds a run), --overwrite deletes the mid-epoch state too
    with pytest.raises(ValueError, match=r"already holds a training run \(stage 1, epoch 0 of 3 and 2 step\(s\) of "
                                         r"the next, mid_epoch.pth.tar\)"):
        Trainer(tiny_net(), options(), out_dir=str(out)).fit(task_loader())
    # the best file is only ever a finished epoch's: a mid-epoch state whose best file went missing has it
    # restored from the checkpoint of the epoch it follows, never from its own (mid-epoch) weights
    run2 = tmp_path / "run2"
    with pytest.raises(Preempted):
        Trainer(tiny_net(), options(), out_dir=str(run2), stop_signals=("TERM",)).fit(
            SignalAt(task_loader(), epoch=1, at=0))
    epoch1 = load(run2 / CKPT)
    assert epoch1["train_state"]["best_epoch"] == 1  # the first epoch improves on nothing (accuracy > 0)
    os.unlink(run2 / BEST)
    info = read_run_info(str(run2 / MID))
    assert (info.epoch, info.step, info.best_epoch) == (1, 1, 1)
    assert RunFolder(str(run2)).reconcile_best(str(run2 / MID), info) is None
    best = load(run2 / BEST)
    assert best["epoch"] == 1 and "mid_epoch" not in best["train_state"]
    weights = epoch1["model_state_dict"]
    assert all(torch.equal(best["model_state_dict"][k], weights[k]) for k in weights)
    fresh = Trainer(tiny_net(), options(epochs=1), out_dir=str(out), overwrite=True)
    fresh.fit(task_loader())
    assert not os.path.exists(out / MID)



class FailAt(SignalAt):
    """A loader whose batch ``at`` of epoch 0 raises (a run that stops before its first save)."""

    def __iter__(self):
        for i, batch in enumerate(self.loader, start=self.loader.start):
            if i == self.at:
                raise RuntimeError("the loader failed")
            yield batch


def test_overwrite_counts_a_preempted_first_epoch_as_the_new_runs_state_and_puts_a_mid_epoch_state_back(tmp_path):
    """--overwrite moves the earlier run's files aside until the new run has saved a state of its own; a
    replacing run preempted in its first epoch has (its mid-epoch state), one that fails before any save
    has not, and the earlier run's files, a mid-epoch state among them, come back."""
    out = tmp_path / "run"
    Trainer(tiny_net(), options(epochs=1), out_dir=str(out)).fit(task_loader())
    with pytest.raises(Preempted):
        Trainer(tiny_net(1), options(), out_dir=str(out), overwrite=True, stop_signals=("TERM",)).fit(
            SignalAt(task_loader(), epoch=0, at=1))
    assert RunFolder(str(out)).run_files() == [str(out / MID)]  # the new run's, not the earlier run's epoch
    resumed = Trainer(tiny_net(1), options(), out_dir=str(out))
    resumed.fit(task_loader(), resume="auto")
    assert [n for n in os.listdir(out) if "gfnet-replaced" in n] == []
    assert load(out / CKPT)["epoch"] == 3
    # an earlier run stopped mid-epoch, replaced by a run that fails before saving anything: put back whole
    run2 = tmp_path / "run2"
    with pytest.raises(Preempted):
        Trainer(tiny_net(), options(), out_dir=str(run2), stop_signals=("TERM",)).fit(
            SignalAt(task_loader(), epoch=0, at=1))
    before = (run2 / MID).read_bytes()
    with pytest.raises(RuntimeError, match="the loader failed"):
        Trainer(tiny_net(1), options(), out_dir=str(run2), overwrite=True).fit(FailAt(task_loader(), at=1))
    assert (run2 / MID).read_bytes() == before
    assert [n for n in os.listdir(run2) if "gfnet-replaced" in n] == []

# ---------------------------------------------------------------- gfnet-train, signalled from outside
@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    from gfnet.data import make_sample_tree

    root = tmp_path_factory.mktemp("preempt") / "tree"
    make_sample_tree(str(root), num_classes=2, train_per_class=8, val_per_class=1, photo_size=(56, 44))
    return str(root)


def train_args(tree, out, backend, *extra):
    return ["--data", tree, "--arch", "test_efficientnet", "--patch-size", "16", "--T", "2", "--stage", "1",
            "--train-global", "yes", "--batch-size", "4", "--epochs", "2", "--lr", "0.05", "--fc-lr", "0.05",
            "--backend", backend, "--workers", "2", "--no-val", "--no-progress", "--device", "cpu", "--out",
            str(out), *extra]


def _env():
    return dict(os.environ, PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def wait_for(path, proc, seconds=180):
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        if proc.poll() is not None:
            pytest.fail(f"the run ended ({proc.returncode}) before its pause:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no pause within {seconds} s")
        time.sleep(0.05)


@pytest.mark.parametrize("backend, sig", [("torchvision", signal.SIGTERM), ("dali", signal.SIGUSR1)])
def test_gfnet_train_signalled_like_slurm_resumes_mid_epoch_exactly(tree, tmp_path, capsys, backend, sig):
    """The whole process group gets the signal, as SLURM sends it to every process of a job (torchrun's
    agent does the same to each worker's group): the torchvision backend's DataLoader workers must not die
    of it in the middle of the save. Exit status 143 (SIGTERM) or 138 (SIGUSR1, with --requeue-signal)."""
    from gfnet.cli.train import main

    extra = ("--requeue-signal", "USR1") if sig == signal.SIGUSR1 else ()
    assert main(train_args(tree, tmp_path / "straight", backend, *extra)) == 0
    out, marker = tmp_path / "run", str(tmp_path / "paused")
    cfg = {"mode": "cli", "argv": train_args(tree, out, backend, *extra),
           "pause": {"step": STEPS + 1, "marker": marker}}
    proc = subprocess.Popen([sys.executable, RUNNER, json.dumps(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(), start_new_session=True)
    try:
        wait_for(marker, proc)
        os.killpg(proc.pid, sig)  # the run's process and its DataLoader workers alike
        open(marker + ".sent", "w").close()
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + sig, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("gfnet-train: ")]
    # the signal came during step 5, the first of epoch 2: the run stopped after it
    assert lines == [f"gfnet-train: stopped by {sig.name} after step 1 of 4 of epoch 2; its state is in {out / MID}: "
                     f"continue with --resume auto (exit status {128 + sig}: requeue the job)"], err[-3000:]
    assert "Traceback" not in err and load(out / CKPT)["epoch"] == 1
    assert load(out / MID)["train_state"]["global_step"] == STEPS + 1
    capsys.readouterr()
    assert main(train_args(tree, out, backend, "--resume", "auto", *extra)) == 0
    assert "epoch 2 continues after step 1" in open(out / "train.log").read()
    assert_same_run(tmp_path / "straight" / CKPT, out / CKPT)


# ---------------------------------------------------------------- the lock of a killed run
def _processes_running(*needles) -> list:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if all(n in cmd for n in needles):
            found.append(int(pid))
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the killed run's workers through /proc")
def test_a_run_killed_with_dataloader_workers_resumes_at_once(tree, tmp_path):
    """SIGKILL after the first checkpoint: the killed process's DataLoader workers (forked, same command
    line) live on for seconds, and the run folder's lock must be free all the same."""
    out = str(tmp_path / "run")
    cfg = {"mode": "folder", "data": tree, "epochs": 2, "workers": 2, "lr": 0.05, "out": out}
    env = _env()
    with open(tmp_path / "killed.log", "w+") as log:  # a file, not a pipe: the orphans would hold a pipe open
        killed = subprocess.Popen([sys.executable, RUNNER, json.dumps({**cfg, "kill": {"file": CKPT, "epoch": 1,
                                                                                      "phase": "after"}})],
                                  stdout=log, stderr=subprocess.STDOUT, env=env)
        assert killed.wait(timeout=300) == -signal.SIGKILL, open(tmp_path / "killed.log").read()[-3000:]
    orphans = _processes_running(RUNNER, out)
    assert orphans, "the killed run's workers are gone already: nothing left to test"
    folder = RunFolder(out)
    folder.orphan_wait_s = 0.0  # the lock must be free now, not after waiting for the orphans
    folder.acquire()
    folder.release()
    assert set(_processes_running(RUNNER, out)) & set(orphans), "the workers ended before the lock was taken"
    resumed = subprocess.run([sys.executable, RUNNER, json.dumps({**cfg, "resume": os.path.join(out, CKPT)})],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["epoch"] for r in json.loads(resumed.stdout.strip().splitlines()[-1])] == [1, 2]


def _holder_with_orphan(out, orphan_seconds):
    """A process that takes the run folder's lock and starts a child that inherits it (as a process forked
    outside Python would); returns (holder, orphan pid)."""
    code = ("import subprocess, sys, time; from gfnet.train.run_folder import RunFolder; f = RunFolder(sys.argv[1]); "
            "f.acquire(); c = subprocess.Popen(['sleep', sys.argv[2]], pass_fds=[f._lock_fd]); "
            "print(c.pid, flush=True); time.sleep(300)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out), str(orphan_seconds)], stdout=subprocess.PIPE,
                              text=True, env=_env())
    return holder, int(holder.stdout.readline())


def test_a_lock_held_by_a_dead_runs_leftover_is_never_reported_as_a_live_run(tmp_path):
    out = tmp_path / "run"
    holder, orphan = _holder_with_orphan(out, 300)
    try:
        with pytest.raises(RunFolderBusy, match=f"in use by another training run \\(pid {holder.pid} "):
            RunFolder(str(out)).acquire()  # the holder lives: a live run
        holder.kill()
        holder.wait()
        folder = RunFolder(str(out))
        folder.orphan_wait_s = 0.5
        with pytest.raises(RunFolderBusy) as e:
            folder.acquire()
        assert str(e.value) == (f"{out} is locked by process(es) {orphan} left behind by training run pid "
                                f"{holder.pid}, which is gone: wait for them to end or stop them, then resume")
    finally:
        holder.kill()
        holder.wait()
        try:
            os.kill(orphan, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # a leftover that ends within the wait: the run starts once it is gone
    holder, orphan = _holder_with_orphan(out, 2)
    holder.kill()
    holder.wait()
    trainer = Trainer(tiny_net(), options(epochs=1), out_dir=str(out))
    trainer.fit(task_loader(), resume="auto")
    assert trainer.epoch == 1
