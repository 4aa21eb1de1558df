"""Faults a hostile user finds at the seams between features (issue 24), each injected for real: class folders
that differ between splits and between a checkpoint and its data, an --overwrite that fails or is SIGKILLed, a
named pipe and a device file as a checkpoint path, a run folder locked by a live process, NaN weights and NaN or
text thresholds, an --out inside the data, a real full disk (tmpfs), a Ctrl-C (SIGINT) in the middle of a save,
impossible arguments, a changed data backend on resume, and temporary files of another host and of a reused pid.

Tiny models (timm's test_resnet / test_efficientnet, 16 px patches) and a small sample tree keep it fast.
"""
import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

import gfnet
from gfnet.checkpoint import _host_tag, atomic_save, remove_stale_temps, save_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CKPT, BEST = "checkpoint.pth.tar", "model_best.pth.tar"

pytestmark = pytest.mark.usefixtures("one_thread", "private_index_cache")


@pytest.fixture
def private_index_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GFNET_CACHE_DIR", str(tmp_path / "index-cache"))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A sample tree with three classes (4 training, 2 validation images each)."""
    from gfnet.data import make_sample_tree

    root = tmp_path_factory.mktemp("hostile") / "data"
    make_sample_tree(str(root), num_classes=3, train_per_class=4, val_per_class=2, photo_size=(48, 40))
    return root


def copy_tree(tree, dest):
    shutil.copytree(tree, dest)
    return dest


def classes_of(root, split="train"):
    return sorted(os.listdir(os.path.join(root, split)))


def train_args(data, out, *extra, stage="1", arch="test_efficientnet"):
    return ["--data", str(data), "--arch", arch, "--patch-size", "16", "--T", "2", "--stage", stage,
            "--batch-size", "4", "--epochs", "1", "--backend", "torchvision", "--workers", "0", "--no-progress",
            "--device", "cpu", "--out", str(out), *extra]


def one_line_error(capsys, prog):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if line.startswith(prog) and ": error: " in line]
    assert errors, err
    assert not any(line.startswith("Traceback") for line in err), err
    return errors[-1]


def train(data, out, *extra, **kw):
    from gfnet.cli.train import main

    return main(train_args(data, out, *extra, **kw))


def file_bytes(folder):
    return {n: (folder / n).read_bytes() for n in (CKPT, BEST) if (folder / n).exists()}


def run_python(code, *args, timeout=300, **kw):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, **kw)


# ---------------------------------------------------------------- 1. one class list for every split
def biased_net(num_classes=3, favourite=2):
    """A GRU GFNet (its glance also goes through the classifier) that predicts ``favourite`` for every image."""
    torch.manual_seed(0)
    net = gfnet.build_model("test_resnet", patch_size=16, T=2, num_classes=num_classes)
    with torch.no_grad():
        net.fc.fc.weight.zero_()
        net.fc.fc.bias.zero_()
        net.fc.fc.bias[favourite] = 50.0
    return net


def test_val_labels_come_from_the_training_class_list(tree, tmp_path, capsys):
    """val/ without the first class: its images keep the training split's labels (before: val's own folder order
    shifted them by one, and the accuracies were computed against wrong labels); an unknown class in val/ is
    refused by name, by gfnet-eval and by gfnet-train."""
    from gfnet.cli.eval import main as eval_main
    from gfnet.data import make_loader
    from gfnet.evaluation import evaluate_checkpoint

    data = copy_tree(tree, tmp_path / "data")
    names = classes_of(data)
    shutil.rmtree(data / "val" / names[0])
    net = biased_net()  # always class 2 (names[2]): right for half of the remaining val images
    net.meta["classes"] = names
    ckpt = tmp_path / "net.pth.tar"
    save_checkpoint(net, str(ckpt))
    result = evaluate_checkpoint(str(ckpt), 2, data=str(data), batch_size=4, backend="torchvision", num_threads=0,
                                 log=None, train_subset=4)
    assert result.anytime_classification == [50.0, 50.0]  # shifted labels gave [0.0, 0.0]

    # a file that names no classes (the reference's): the training split's folders give the labels
    plain = torch.load(ckpt, weights_only=True)
    del plain["classes"]
    torch.save(plain, tmp_path / "plain.pth.tar")
    result = evaluate_checkpoint(str(tmp_path / "plain.pth.tar"), 2, data=str(data), batch_size=4,
                                 backend="torchvision", num_threads=0, log=None, train_subset=4)
    assert result.anytime_classification == [50.0, 50.0]
    loader = make_loader(str(data), train=False, batch_size=8, backend="torchvision", num_threads=0,
                         image_size=32, classes=names)
    assert torch.cat([y for _, y in loader]).tolist() == [1, 1, 2, 2] and loader.classes == names

    # a class the model does not know: refused by name, before any image is read
    os.makedirs(data / "val" / "zebra")
    shutil.copy(next((data / "val" / names[1]).iterdir()), data / "val" / "zebra" / "z.JPEG")
    common = ["--eval-mode", "2", "--data", str(data), "--backend", "torchvision", "--num-threads", "0",
              "--batch-size", "4"]
    assert eval_main(["--checkpoint", str(ckpt)] + common) == 2
    line = one_line_error(capsys, "gfnet-eval")
    assert "holds 1 class folder(s) that the model does not know: 'zebra'" in line, line
    assert train(data, tmp_path / "run") == 2
    assert "'zebra'" in one_line_error(capsys, "gfnet-train")
    assert not (tmp_path / "run" / CKPT).exists()


# ---------------------------------------------------------------- 2. the data's classes against the checkpoint's
def test_resume_and_stage2_refuse_changed_classes_before_any_work(tree, tmp_path, capsys):
    data = copy_tree(tree, tmp_path / "data")
    out = tmp_path / "run"
    assert train(data, out) == 0
    names = classes_of(data)
    before = file_bytes(out)

    # a renamed class: same count, other names (before: trained on with shifted labels, exit 0)
    for split in ("train", "val"):
        os.rename(data / split / names[1], data / split / "renamed")
    assert train(data, out, "--resume", "auto", "--epochs", "2") == 2
    line = one_line_error(capsys, "gfnet-train")
    assert "does not hold the 3 classes" in line and "'renamed'" in line and repr(names[1]) in line, line
    assert file_bytes(out) == before
    for split in ("train", "val"):
        os.rename(data / split / "renamed", data / split / names[1])
    assert torch.load(out / CKPT, weights_only=True)["classes"] == names  # the class list travels with the model

    # an added class (before: IndexError "Target 3 is out of bounds" in the middle of the epoch)
    extra = data / "train" / "n9999999"
    shutil.copytree(data / "train" / names[0], extra)
    assert train(data, out, "--resume", "auto", "--epochs", "2") == 2
    assert "1 unknown class folder(s) 'n9999999'" in one_line_error(capsys, "gfnet-train")
    assert file_bytes(out) == before
    # stage 2 on a tree with more classes: the same refusal, named
    assert train(data, tmp_path / "s2", "--checkpoint", str(out / BEST), stage="2") == 2
    assert "'n9999999'" in one_line_error(capsys, "gfnet-train")
    assert not (tmp_path / "s2" / CKPT).exists()

    # a file without a class list (the reference's, or an earlier gfnet's): the class count must agree
    plain = torch.load(out / BEST, weights_only=True)
    del plain["classes"]
    torch.save(plain, tmp_path / "plain.pth.tar")
    assert train(data, tmp_path / "s2b", "--checkpoint", str(tmp_path / "plain.pth.tar"), stage="2") == 2
    assert "holds 4 class folders, but" in one_line_error(capsys, "gfnet-train")
    shutil.rmtree(extra)
    assert train(data, tmp_path / "s2c", "--checkpoint", str(tmp_path / "plain.pth.tar"), stage="2") == 0
    assert torch.load(tmp_path / "s2c" / CKPT, weights_only=True)["classes"] == names


# ---------------------------------------------------------------- 3. --overwrite keeps the earlier run until ...
KILL_IN_EPOCH = """
import os, signal, sys
import gfnet.train.trainer as trainer
def die(self, loader, epoch):
    os.kill(os.getpid(), signal.SIGKILL)
trainer.Trainer.train_epoch = die
from gfnet.cli.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_overwrite_loses_nothing_until_the_new_run_has_a_checkpoint(tree, tmp_path, capsys):
    data, out = tree, tmp_path / "run"
    assert train(data, out) == 0
    before = file_bytes(out)
    assert set(before) == {CKPT, BEST}

    def unchanged():
        assert file_bytes(out) == before
        assert [n for n in os.listdir(out) if "gfnet-replaced" in n or n.endswith(".gfnet-tmp")] == []

    # a batch too large for the data: refused after the folder was taken
    assert train(data, out, "--overwrite", "--batch-size", "64") == 2
    assert "yields no batch" in one_line_error(capsys, "gfnet-train")
    unchanged()
    # a divergence in epoch 1
    assert train(data, out, "--overwrite", "--lr", "1e30", "--fc-lr", "1e30") == 1
    assert "diverged in epoch 1" in one_line_error(capsys, "gfnet-train")
    unchanged()
    # stage 2 from the folder's own best file, into the same folder, failing
    assert train(data, out, "--overwrite", "--batch-size", "64", "--checkpoint", str(out / BEST), stage="2") == 2
    unchanged()
    # SIGKILL in the middle of the replacing run's first epoch: the next start in the folder puts the old run back
    proc = run_python(KILL_IN_EPOCH, *train_args(data, out, "--overwrite"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / CKPT).exists()  # moved aside, not deleted
    assert train(data, out, "--resume", "auto") == 0  # nothing left to train: the old run, restored
    unchanged()
    # a replacing run that succeeds replaces it, best file included
    old_run = torch.load(out / CKPT, weights_only=True)["train_state"]["run_id"]
    assert train(data, out, "--overwrite", "--seed", "7") == 0
    new_run = torch.load(out / CKPT, weights_only=True)["train_state"]["run_id"]
    assert new_run != old_run
    assert not (out / BEST).exists() or torch.load(out / BEST, weights_only=True)["train_state"]["run_id"] == new_run
    assert [n for n in os.listdir(out) if "gfnet-replaced" in n] == []


# ---------------------------------------------------------------- 4. never replace a pipe or a device
@pytest.fixture
def tiny_checkpoint_obj():
    return {"a": torch.arange(4.0)}


def test_atomic_save_refuses_a_named_pipe(tmp_path, tiny_checkpoint_obj):
    fifo = tmp_path / "ckpt.pth.tar"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="is a named pipe \\(FIFO\\), not a regular file"):
        atomic_save(tiny_checkpoint_obj, str(fifo))
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    link = tmp_path / "link.pth.tar"
    os.symlink(fifo.name, link)
    with pytest.raises(ValueError, match="through the link to .* named pipe"):
        save_checkpoint(gfnet.build_model("test_efficientnet", patch_size=16, T=2, num_classes=2), str(link))
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.path.islink(link)
    assert [n for n in os.listdir(tmp_path) if n.endswith(".gfnet-tmp")] == []
    # a symlink to a regular file is still written through
    (tmp_path / "real.pth.tar").write_bytes(b"old")
    os.symlink("real.pth.tar", tmp_path / "ok.pth.tar")
    atomic_save(tiny_checkpoint_obj, str(tmp_path / "ok.pth.tar"))
    assert os.path.islink(tmp_path / "ok.pth.tar")
    assert torch.equal(torch.load(tmp_path / "real.pth.tar", weights_only=True)["a"], torch.arange(4.0))


@pytest.mark.skipif(os.geteuid() != 0, reason="making a device node needs root")
def test_atomic_save_refuses_a_device_file_of_its_own(tmp_path, tiny_checkpoint_obj):
    """A character device made in tmp_path (the numbers of /dev/null): refused, still a device afterwards."""
    node = tmp_path / "null-device"
    os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    with pytest.raises(ValueError, match="is a character device, not a regular file"):
        atomic_save(tiny_checkpoint_obj, str(node))
    assert stat.S_ISCHR(os.lstat(node).st_mode)


def test_atomic_save_refuses_a_link_to_dev_null(tmp_path, monkeypatch, tiny_checkpoint_obj):
    """Through a link in tmp_path to /dev/null. Guarded: should the refusal ever break, the rename is stopped
    before it can touch anything outside tmp_path, so the test can fail but never replace /dev/null."""
    real_replace = os.replace

    def guarded_replace(src, dst, *args, **kwargs):
        if not os.path.realpath(dst).startswith(str(tmp_path)):
            raise AssertionError(f"atomic_save tried to replace {dst}")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", guarded_replace)
    link = tmp_path / "to-dev-null.pth.tar"
    os.symlink("/dev/null", link)
    with pytest.raises(ValueError, match="through the link to /dev/null\\) is a character device"):
        atomic_save(tiny_checkpoint_obj, str(link))
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


# ---------------------------------------------------------------- 5. gfnet-eval --write respects the run lock
def test_eval_write_refuses_a_run_folder_in_use(tree, tmp_path, capsys):
    from gfnet.cli.eval import main as eval_main

    out = tmp_path / "run"
    assert train(tree, out) == 0
    before = (out / CKPT).read_bytes()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from gfnet.train.run_folder import RunFolder; "
                               f"RunFolder({str(out)!r}).acquire(); print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    args = ["--checkpoint", str(out / CKPT), "--eval-mode", "2", "--data", str(tree), "--backend", "torchvision",
            "--num-threads", "0", "--batch-size", "4", "--write"]
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert eval_main(args) == 1
        captured = capsys.readouterr()
        assert "fitting thresholds" not in captured.out  # refused before the work
        assert f"is in a run folder that is in use (pid {holder.pid} " in captured.err, captured.err
        assert (out / CKPT).read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
    assert eval_main(args) == 0  # the holder is gone: the lock is free
    assert torch.load(out / CKPT, weights_only=True)["dynamic_threshold"] is not None


# ---------------------------------------------------------------- 6. NaN never becomes class 0 or a threshold
def test_nan_weights_and_nan_thresholds_are_refused_everywhere(tree, tmp_path, capsys):
    from gfnet import budget
    from gfnet.cli.eval import main as eval_main
    from gfnet.cli.viz import main as viz_main
    from gfnet.evaluation import collect_shard_outputs

    torch.manual_seed(0)
    net = gfnet.build_model("test_efficientnet", patch_size=16, T=2, num_classes=3).eval()
    good = tmp_path / "good.pth.tar"
    save_checkpoint(net, str(good))
    # images with NaN pixels: reported as -1 (and an immediate exit), as budgeted_predict does, never class 0
    images = torch.randn(4, 3, 32, 32)
    images[1, 0, 5, 5] = float("nan")
    out = collect_shard_outputs(net, [(images, torch.tensor([0, 0, 1, 2]))])
    assert out.preds[:, 1].tolist() == [-1, -1] and (out.preds[:, [0, 2, 3]] >= 0).all()
    with pytest.raises(ValueError, match="non-finite max probabilities"):
        budget.find_thresholds(out.confidences, None, budget.exit_proportions(1.0, 2))

    # NaN weights: refused before any data is read (before: every image counted as class 0, NaN thresholds fitted
    # and written, exit 0)
    with torch.no_grad():
        net.fc.fc_2.weight[0, 0] = float("nan")
    bad = tmp_path / "nan.pth.tar"
    save_checkpoint(net, str(bad))
    common = ["--data", str(tree), "--backend", "torchvision", "--num-threads", "0", "--batch-size", "4"]
    before = bad.read_bytes()
    assert eval_main(["--checkpoint", str(bad), "--eval-mode", "2", "--write"] + common) == 2
    assert "hold NaN or inf (e.g. fc.fc_2.weight)" in one_line_error(capsys, "gfnet-eval")
    assert bad.read_bytes() == before

    # stored NaN thresholds: mode 1 refuses them, and so does gfnet-viz (by budget index or given)
    stored = torch.load(good, weights_only=True)
    table = torch.rand(39, 2)
    table[:, 1] = -1e8
    table[3, 0] = float("nan")
    stored["dynamic_threshold"] = table
    torch.save(stored, tmp_path / "nan_thresholds.pth.tar")
    assert eval_main(["--checkpoint", str(tmp_path / "nan_thresholds.pth.tar"), "--eval-mode", "1"] + common) == 2
    assert "holds NaN in 1 of its 39 rows (e.g. rows [3])" in one_line_error(capsys, "gfnet-eval")
    images_dir = str(tree / "val")
    for ckpt, thresholds in ((tmp_path / "nan_thresholds.pth.tar", "3"), (good, "nan,-1e8")):
        assert viz_main(["--checkpoint", str(ckpt), "--images", images_dir, "--out", str(tmp_path / "p.png"),
                         "--thresholds", thresholds]) == 2
        assert "NaN" in one_line_error(capsys, "gfnet-viz")
    assert not (tmp_path / "p.png").exists()


# ---------------------------------------------------------------- 7. --out inside the data
def test_out_inside_the_training_split_is_refused(tree, tmp_path, capsys):
    data = copy_tree(tree, tmp_path / "data")
    for out in (data / "train" / "runs", data / "val" / "r" / "s1"):
        assert train(data, out) == 2
        assert "lies inside the dataset's" in one_line_error(capsys, "gfnet-train")
        assert not out.exists()
    assert classes_of(data) == classes_of(tree)


# ---------------------------------------------------------------- 8. a real full disk, found before the work
@contextlib.contextmanager
def full_filesystem(path, size="4m", keep=None):
    """A real tmpfs of ``size`` at ``path`` (needs root), holding ``keep`` (files to copy in) and then filled to
    the last byte."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        for src in keep or ():
            shutil.copy(src, path)
        fd = os.open(os.path.join(path, "filler"), os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)  # tmpfs hands out whole pages: the last one fails, the disk is full
        except OSError:
            pass
        finally:
            os.close(fd)
        yield
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)  # a file still open: detach it anyway


def test_full_disk_is_found_before_the_work_and_named(tree, tmp_path, capsys):
    from gfnet.cli.eval import main as eval_main

    full = tmp_path / "full"
    with full_filesystem(full):
        assert train(tree, full / "run") == 1
        line = one_line_error(capsys, "gfnet-train")
        assert f"{full / 'run'}: --out is not writable: No space left on device" in line, line
    torch.manual_seed(0)
    net = gfnet.build_model("test_efficientnet", patch_size=16, T=2, num_classes=3)
    save_checkpoint(net, str(tmp_path / "net.pth.tar"))
    with full_filesystem(full, keep=[tmp_path / "net.pth.tar"]):
        args = ["--checkpoint", str(full / "net.pth.tar"), "--eval-mode", "2", "--data", str(tree), "--backend",
                "torchvision", "--num-threads", "0", "--batch-size", "4", "--write"]
        assert eval_main(args) == 1
        captured = capsys.readouterr()
        assert "fitting thresholds" not in captured.out  # before: the whole evaluation, then the failure
        assert "not writable: No space left on device" in captured.err, captured.err


# ---------------------------------------------------------------- 9. the remaining tracebacks
SLOW_SAVE = """
import os, sys, time
import gfnet.checkpoint as checkpoint
real_write = checkpoint._ErrorKeepingWriter.write
def slow_write(self, data):  # a slow disk: a save takes seconds (about a thousand writes of 2 ms)
    if not getattr(self, "announced", False):
        self.announced = True
        print("saving", flush=True)
    written = real_write(self, data)
    time.sleep(0.002)  # the interrupt lands after the bytes went out, before torch's writer hears back
    return written
checkpoint._ErrorKeepingWriter.write = slow_write
from gfnet.cli.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_during_a_checkpoint_save_is_one_line_and_leaves_no_file(tree, tmp_path):
    """SIGINT to the process group (what Ctrl-C in a terminal sends) in the middle of a save. Before: torch.save's
    zip writer, left half-way, failed on closing with "RuntimeError: unexpected pos", a traceback that hid the
    interrupt."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, *train_args(tree, out, "--no-val")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "saving", proc.stderr.read()[-2000:]
        time.sleep(0.3)  # well inside the save
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "gfnet-train: error: interrupted" in err
    assert sorted(os.listdir(out)) == [".gfnet-run.lock", "train.log"]  # no half file, no temporary file


@contextlib.contextmanager
def memory_ceiling(extra: int):
    """Limit this process's data memory (RLIMIT_DATA) to what it uses now plus ``extra`` bytes, for the block."""
    import resource

    with open("/proc/self/status") as fh:
        used = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmData:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (used + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def test_impossible_values_are_one_line_errors(tmp_path, capsys):
    from gfnet.cli import bench, data, viz
    from gfnet.cli import eval as eval_cli
    from gfnet.engine import budgeted_predict

    assert bench.main(["budget", "--quick", "--device", "cpu", "--set", "batch_size=-4"]) == 2
    assert "--set batch_size=-4" in one_line_error(capsys, "gfnet-bench")
    with pytest.raises(SystemExit) as e:
        data.main(["make-sample", str(tmp_path / "d"), "--quality", "500"])
    assert e.value.code == 2 and "--quality" in one_line_error(capsys, "gfnet-data")
    assert not (tmp_path / "d").exists()

    torch.manual_seed(0)
    net = gfnet.build_model("test_efficientnet", patch_size=16, T=2, num_classes=3).eval()
    good = tmp_path / "good.pth.tar"
    save_checkpoint(net, str(good))
    obj = torch.load(good, weights_only=True)
    for field, value, message in (("model_name", 123, "its 'model_name' is int 123, not a backbone name"),
                                  ("patch_size", "16", "its 'patch_size' is str '16', not a whole number"),
                                  ("dynamic_threshold", [["a", "b"]] * 39, "must be numbers")):
        torch.save({**obj, field: value}, tmp_path / "odd.pth.tar")
        mode = "1" if field == "dynamic_threshold" else "0"
        args = ["--checkpoint", str(tmp_path / "odd.pth.tar"), "--eval-mode", mode]
        if mode == "1":
            args += ["--data", str(tmp_path)]
        assert eval_cli.main(args) == 2, field
        assert message in one_line_error(capsys, "gfnet-eval"), field
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with pytest.raises(ValueError, match="thresholds must be numbers"):
        budgeted_predict(net, images, ["0.5", "x"], batch_size=2)
    # capacity: checked before the slot table is allocated (10**9 slots exhausted the memory); under a memory
    # ceiling, so that a regression fails here with a MemoryError instead of taking the machine's memory
    with memory_ceiling(1 << 30), pytest.raises(ValueError, match="capacity must be an int from batch_size to "
                                                                  "T \\* batch_size \\(2..4"):
        budgeted_predict(net, images, [0.5, -1e8], batch_size=2, capacity=10**9)

    # gfnet-viz: the output format before the model runs (a corrupt checkpoint is never read)
    (tmp_path / "corrupt.pth.tar").write_bytes(b"not a checkpoint")
    assert viz.main(["--checkpoint", str(tmp_path / "corrupt.pth.tar"), "--images", str(tmp_path),
                     "--out", str(tmp_path / "patches.xyz")]) == 2
    assert "cannot write '.xyz' files; use .png" in one_line_error(capsys, "gfnet-viz")
    assert viz.main(["budget", str(good), "--out", str(tmp_path / "curve.bmpx")]) == 2
    assert "cannot write '.bmpx' files" in one_line_error(capsys, "gfnet-viz")


# ---------------------------------------------------------------- 10. a changed data backend is said on resume
def test_resume_with_another_backend_is_said_and_recorded(tree, tmp_path, caplog):
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "run"
    assert train(tree, out) == 0
    caplog.set_level("WARNING", logger="gfnet.train")
    args = train_args(tree, out, "--resume", "auto", "--epochs", "2")
    args[args.index("--backend") + 1] = "dali"
    from gfnet.cli.train import main

    assert main(args) == 0
    said = [r.getMessage() for r in caplog.records if "data backend" in r.getMessage()]
    assert said and said[0].startswith("resume: data backend changes from 'torchvision' to 'dali' (from epoch 2 on)")
    state = torch.load(out / CKPT, weights_only=True)["train_state"]
    assert {"epoch": 1, "option": "data_backend", "from": "torchvision", "to": "dali"} in state["changes"]
    assert state["data_backend"] == "dali"


# ---------------------------------------------------------------- 11. temporary files of other hosts, reused pids
def test_stale_temporaries_of_other_hosts_and_reused_pids(tmp_path):
    from gfnet.train.run_folder import RunFolder

    host = _host_tag()
    hour_ago = time.time() - 3600
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.1)
        names = {
            # this host, a pid that now belongs to a process started after the file was written: reused
            f".checkpoint.pth.tar.{host}-{sleeper.pid}.ab12_c.gfnet-tmp": (hour_ago, False),
            # this host, our own pid, written just now: a live writer's
            f".checkpoint.pth.tar.{host}-{os.getpid()}.ab12_d.gfnet-tmp": (time.time(), True),
            # another host, an hour old: stays without the lock, goes under it
            f".checkpoint.pth.tar.node7-{os.getpid()}.ab12_e.gfnet-tmp": (hour_ago, True),
            # another host, just written: its writer may be alive, it stays even under the lock
            ".model_best.pth.tar.node7-12345.ab12_f.gfnet-tmp": (time.time(), True),
        }
        for name, (mtime, _) in names.items():
            (tmp_path / name).write_bytes(b"x" * 100)
            os.utime(tmp_path / name, (mtime, mtime))
        atomic_save({"a": torch.zeros(2)}, str(tmp_path / "other.pth.tar"))  # no lock: the conservative rule
        left = set(os.listdir(tmp_path))
        for name, (_, kept) in names.items():
            assert (name in left) == kept, name
    finally:
        sleeper.kill()
        sleeper.wait()
    folder = RunFolder(str(tmp_path))
    folder.acquire()  # the run folder's lock: nobody else of gfnet writes here now
    try:
        left = set(os.listdir(tmp_path))
        assert f".checkpoint.pth.tar.node7-{os.getpid()}.ab12_e.gfnet-tmp" not in left
        assert ".model_best.pth.tar.node7-12345.ab12_f.gfnet-tmp" in left
        assert f".checkpoint.pth.tar.{host}-{os.getpid()}.ab12_d.gfnet-tmp" in left
    finally:
        folder.release()
    assert remove_stale_temps(str(tmp_path)) == []
