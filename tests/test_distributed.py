"""gfnet under torchrun, for real (issue 15): distributed evaluation, two "nodes" on one machine, elastic restarts.

Every test launches ``python -m torch.distributed.run`` (the torchrun launcher) as a subprocess: real worker
processes, gloo on the CPU, the c10d rendezvous on 127.0.0.1 at a free port; no part of torch.distributed is
mocked. Workers run either gfnet's own commands (``-m gfnet.cli.eval``, ``-m gfnet.cli.train``) or this
file as a script (``python tests/test_distributed.py WORKER ...``, see ``_worker_main`` at the end), which
adds what a test needs around the library: a dump of the gathered outputs, or a fault that SIGKILLs one
worker in the middle of an epoch on the first attempt only.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
LAUNCH_TIMEOUT_S = 240  # one launch on the 2-core machine takes 10-40 s; a hang must fail, not stall CI

EVAL_COMMON = ["--backend", "torchvision", "--num-threads", "0", "--batch-size", "2", "--device", "cpu"]
# 16 training images, a global batch of 4: 2 per process and 4 steps per epoch on each of 2 processes
TRAIN_COMMON = ["--arch", "test_efficientnet", "--patch-size", "16", "--T", "2", "--stage", "1", "--train-global",
                "yes", "--batch-size", "4", "--epochs", "2", "--backend", "torchvision", "--workers", "0",
                "--no-progress", "--no-val", "--device", "cpu", "--seed", "3", "--resume", "auto"]
STEPS_PER_EPOCH = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(port: int, nproc: int, target: list, nnodes: int = 1, max_restarts: int = 0, env: dict = None,
              run_id: str = "gfnet-test", rendezvous: str = "c10d") -> subprocess.Popen:
    """Start one torchrun launcher (one "node") on localhost; its output goes to a temporary file (not a
    pipe: the workers, in sessions of their own, could hold a pipe open after the launcher is gone).
    ``rendezvous``: "c10d" (the elastic rendezvous at 127.0.0.1:port) or "static" (--master-addr/port,
    one node)."""
    if rendezvous == "c10d":
        meet = ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}"]
    else:
        meet = ["--node-rank=0", "--master-addr=127.0.0.1", f"--master-port={port}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}", *meet,
           f"--max-restarts={max_restarts}", "--monitor-interval=0.5"] + target
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def _finish(proc: subprocess.Popen, what: str) -> str:
    """Wait for a launcher (bounded) and return its output; fail with the output if it failed or hung."""
    try:
        proc.wait(timeout=LAUNCH_TIMEOUT_S)
        hung = False
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun's agent stops its workers on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        hung = True
    proc.log.seek(0)
    out = proc.log.read()
    proc.log.close()
    if hung:
        pytest.fail(f"{what} hung for {LAUNCH_TIMEOUT_S} s:\n{out[-4000:]}")
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{out[-4000:]}"
    return out


def _run(port, nproc, target, what, **kwargs) -> str:
    return _finish(_torchrun(port, nproc, target, **kwargs), what)


# ---------------------------------------------------------------------------------------------- evaluation
@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    import gfnet
    from gfnet.data import make_sample_tree

    root = tmp_path_factory.mktemp("dist_eval")
    tree = root / "tree"
    # 3 classes x 3 val images = 9: shards of 5 and 4 (2 processes) or 3, 3, 3 (3 processes), each
    # ending in a partial batch of 1 at batch size 2; 3 x 5 = 15 training images (shards of 8 and 7)
    make_sample_tree(tree, num_classes=3, train_per_class=5, val_per_class=3, photo_size=(64, 48))
    torch.manual_seed(0)
    net = gfnet.build_model("resnet10t", patch_size=32, T=3, num_classes=3, classifier="cascade").eval()
    with torch.no_grad():  # sharper outputs than at initialisation: the thresholds split the images
        for k in range(2, 4):
            getattr(net.fc, f"fc_{k}").weight.mul_(30.0)
        net.model_prime.head.weight.mul_(30.0)
    checkpoint = root / "tiny.pth.tar"
    gfnet.save_checkpoint(net, str(checkpoint))
    return str(tree), str(checkpoint)


@pytest.mark.usefixtures("native_cpu_convolutions")
def test_gfnet_eval_under_torchrun_equals_one_process(eval_setup, tmp_path):
    """Mode 2 with real early exit on 2 processes: the thresholds, anytime accuracies and budget curve
    that rank 0 writes equal one process's; only rank 0 prints; images/s is summed over the ranks."""
    from gfnet.cli.eval import main

    tree, checkpoint = eval_setup
    single, multi = str(tmp_path / "single.pth.tar"), str(tmp_path / "multi.pth.tar")
    shutil.copy(checkpoint, single)
    shutil.copy(checkpoint, multi)
    args = ["--eval-mode", "2", "--data", tree, "--write", "--train-subset", "13", "--real-exit",
            "--real-exit-points", "5", "35"] + EVAL_COMMON
    assert main(["--checkpoint", single] + args) == 0
    out = _run(_free_port(), 2, ["-m", "gfnet.cli.eval", "--checkpoint", multi] + args, "gfnet-eval on 2 processes")

    # rank 0 alone reports, once
    assert out.count("anytime_classification:") == 1, out
    assert out.count("wrote the results into") == 1, out
    assert "fitting thresholds on 13 training images (2 processes)" in out
    assert "9 validation images on 2 processes" in out
    assert "summed over 2 processes" in out
    assert out.count("point  5:") == 1 and out.count("point 35:") == 1, out
    assert "differs from the post-hoc simulation" not in out  # every rank's real exit equals the simulation
    assert "Traceback" not in out

    a = torch.load(single, weights_only=True)
    b = torch.load(multi, weights_only=True)
    assert a["anytime_classification"] == pytest.approx(b["anytime_classification"], abs=1e-9)
    assert torch.allclose(a["dynamic_threshold"], b["dynamic_threshold"], rtol=0, atol=1e-5)
    (cost_a, acc_a), (cost_b, acc_b) = a["budgeted_batch_classification"], b["budgeted_batch_classification"]
    assert cost_a == pytest.approx(cost_b, rel=1e-6) and acc_a == pytest.approx(acc_b, abs=1e-9)


@pytest.mark.usefixtures("native_cpu_convolutions")
def test_gathered_outputs_cover_every_image_once_in_dataset_order(eval_setup, tmp_path):
    """3 processes over 9 images at batch 2 (each shard ends in a partial batch): rank 0's gathered outputs
    hold every image exactly once, in dataset order, equal to one process's outputs image by image."""
    import gfnet
    from gfnet.data import make_loader
    from gfnet.evaluation import collect_shard_outputs

    tree, checkpoint = eval_setup
    dump = str(tmp_path / "gathered.pt")
    _run(_free_port(), 3, [HERE, "gather", checkpoint, tree, dump], "gather on 3 processes")
    got = torch.load(dump, weights_only=False)

    net = gfnet.load_checkpoint(checkpoint).eval()
    c = net.config
    loader = make_loader(tree, train=False, batch_size=2, image_size=c.image_size, crop_pct=c.crop_pct,
                         interpolation=c.dataset_interpolation, backend="torchvision", num_threads=0)
    want = collect_shard_outputs(net, loader)
    assert torch.equal(want.indices, torch.arange(9))
    assert torch.equal(got["indices"], want.indices)  # none dropped, none twice, in dataset order
    assert got["shard_sizes"] == [3, 3, 3]
    assert torch.equal(got["targets"], want.targets)
    assert torch.equal(got["preds"], want.preds)
    assert torch.allclose(got["max_probs"], want.max_probs, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def train_tree(tmp_path_factory):
    from gfnet.data import make_sample_tree

    root = tmp_path_factory.mktemp("dist_train") / "tree"
    make_sample_tree(root, num_classes=2, train_per_class=8, val_per_class=1, photo_size=(48, 40))
    return str(root)


@pytest.fixture(scope="module")
def one_node_run(train_tree, tmp_path_factory):
    """The reference run: ``torchrun --nnodes 1 --nproc-per-node 2``, uninterrupted."""
    out = str(tmp_path_factory.mktemp("one_node") / "run")
    _run(_free_port(), 2, ["-m", "gfnet.cli.train", "--data", train_tree, "--out", out] + TRAIN_COMMON,
         "training on 1 node x 2 processes")
    return os.path.join(out, "checkpoint.pth.tar")


def _assert_same_training(a_path: str, b_path: str) -> None:
    a = torch.load(a_path, weights_only=False)
    b = torch.load(b_path, weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    for field in ("model_state_dict", "model_prime_state_dict", "fc"):
        assert a[field].keys() == b[field].keys()
        for k in a[field]:
            assert torch.equal(a[field][k], b[field][k]), f"{field}.{k} differs"
    for k, v in a["optimizer"]["state"].items():
        for name, tensor in v.items():
            assert torch.equal(torch.as_tensor(tensor), torch.as_tensor(b["optimizer"]["state"][k][name]))
    assert [h["loss"] for h in a["train_state"]["history"]] == [h["loss"] for h in b["train_state"]["history"]]
    assert a["train_state"]["global_step"] == b["train_state"]["global_step"] == 2 * STEPS_PER_EPOCH


def test_two_nodes_equal_one_node(train_tree, one_node_run, tmp_path):
    """``torchrun --nnodes 2 --nproc-per-node 1`` (two launchers on localhost meeting through the c10d
    rendezvous) trains bit-identical weights to ``--nnodes 1 --nproc-per-node 2``."""
    out = str(tmp_path / "run")
    port = _free_port()
    target = ["-m", "gfnet.cli.train", "--data", train_tree, "--out", out] + TRAIN_COMMON
    nodes = [_torchrun(port, 1, target, nnodes=2, run_id="two-nodes") for _ in range(2)]
    for k, node in enumerate(nodes):
        _finish(node, f"node {k} of 2")
    with open(os.path.join(out, "train.log")) as f:
        assert "2 process(es) on cpu" in f.read()  # the two launchers made one job of world size 2
    _assert_same_training(one_node_run, os.path.join(out, "checkpoint.pth.tar"))


@pytest.mark.parametrize("rendezvous, kill_rank, kill_step", [
    ("c10d", 1, STEPS_PER_EPOCH + 1),  # a worker, at the second step of epoch 2
    ("static", 0, STEPS_PER_EPOCH + 2),  # rank 0, which writes the checkpoints, at the third step of epoch 2
])
def test_elastic_restart_after_a_killed_worker_equals_uninterrupted_run(train_tree, one_node_run, tmp_path,
                                                                        rendezvous, kill_rank, kill_step):
    """``torchrun --max-restarts 1``: one rank SIGKILLs itself in the middle of epoch 2 (first attempt only);
    torchrun restarts both workers, ``--resume auto`` finds epoch 1's checkpoint, epoch 2 is redone, and the
    finished run equals the uninterrupted one bit for bit."""
    out = str(tmp_path / "run")
    marker = str(tmp_path / "killed")
    env = {"GFNET_TEST_KILL_RANK": str(kill_rank), "GFNET_TEST_KILL_STEP": str(kill_step),
           "GFNET_TEST_KILL_MARKER": marker}
    log = _run(_free_port(), 2, [HERE, "train", "--data", train_tree, "--out", out] + TRAIN_COMMON,
               "elastic training", max_restarts=1, env=env, rendezvous=rendezvous)
    with open(marker) as f:  # the fault fired: that rank died at that step of the first attempt
        assert f.read().split() == ["rank", str(kill_rank), "step", str(kill_step), "attempt", "0"]
    assert "exitcode: -9" in log, log[-3000:]  # torchrun saw a worker die of SIGKILL, and went on
    with open(os.path.join(out, "train.log")) as f:
        train_log = f.read()
    assert "resumed from" in train_log and "at epoch 1 (step 4)" in train_log  # restarted after epoch 1
    _assert_same_training(one_node_run, os.path.join(out, "checkpoint.pth.tar"))


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step_and_resumes_exactly(train_tree, one_node_run,
                                                                                    tmp_path):
    """SIGTERM sent to rank 1 alone in the middle of epoch 2: both ranks finish the same step, rank 0 writes
    mid_epoch.pth.tar with every rank's state, both exit with status 143; ``--resume auto`` continues the
    epoch there and the finished run equals the uninterrupted one bit for bit."""
    out = str(tmp_path / "run")
    marker, status = str(tmp_path / "paused"), str(tmp_path / "status")
    env = {"GFNET_TEST_PAUSE_RANK": "1", "GFNET_TEST_PAUSE_STEP": str(STEPS_PER_EPOCH + 1),
           "GFNET_TEST_PAUSE_MARKER": marker, "GFNET_TEST_STATUS": status}
    proc = _torchrun(_free_port(), 2, [HERE, "train", "--data", train_tree, "--out", out] + TRAIN_COMMON, env=env)
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not os.path.exists(marker) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if os.path.exists(marker):  # rank 1 waits after its step 5 (the second of epoch 2) for the signal
        with open(marker) as f:
            os.kill(int(f.read()), signal.SIGTERM)
        open(marker + ".sent", "w").close()
    proc.wait(timeout=LAUNCH_TIMEOUT_S)
    proc.log.seek(0)
    log = proc.log.read()
    assert os.path.exists(marker), f"rank 1 never reached its pause:\n{log[-4000:]}"
    statuses = {}
    for rank in (0, 1):
        with open(f"{status}.{rank}") as f:
            statuses[rank] = int(f.read())
    assert statuses == {0: 143, 1: 143}, log[-4000:]
    mid = torch.load(os.path.join(out, "mid_epoch.pth.tar"), weights_only=True)
    state = mid["train_state"]
    # the signal came after step 5; every rank stopped after step 6 (the vote travels with the next step)
    assert mid["epoch"] == 1 and state["global_step"] == STEPS_PER_EPOCH + 2
    assert state["mid_epoch"]["step"] == 2 and state["mid_epoch"]["world_size"] == 2
    assert [p["steps_done"] for p in state["mid_epoch"]["processes"]] == [2, 2]
    assert len(state["rng"]) == 2
    assert torch.load(os.path.join(out, "checkpoint.pth.tar"), weights_only=True)["epoch"] == 1
    _run(_free_port(), 2, ["-m", "gfnet.cli.train", "--data", train_tree, "--out", out] + TRAIN_COMMON,
         "the resumed run")
    with open(os.path.join(out, "train.log")) as f:
        assert "epoch 2 continues after step 2" in f.read()
    assert not os.path.exists(os.path.join(out, "mid_epoch.pth.tar"))
    _assert_same_training(one_node_run, os.path.join(out, "checkpoint.pth.tar"))


def test_resume_auto_starts_fresh_in_an_empty_folder(train_tree, tmp_path):
    from gfnet.train.run_folder import RunFolder

    assert RunFolder(str(tmp_path)).resolve_resume("auto") is None


# ---------------------------------------------------------------------------------------------- workers
def _gather_worker(checkpoint: str, tree: str, dump: str) -> int:
    """Each rank computes its shard's anytime outputs; rank 0 saves what it gathered."""
    import gfnet
    from gfnet.data import make_loader
    from gfnet.evaluation import collect_shard_outputs, gather_outputs
    from gfnet.train.distributed import init_distributed

    torch.backends.mkldnn.enabled = False  # as the native_cpu_convolutions fixture of the single-process side
    ctx = init_distributed("cpu")
    try:
        net = gfnet.load_checkpoint(checkpoint).eval()
        c = net.config
        loader = make_loader(tree, train=False, batch_size=2, image_size=c.image_size, crop_pct=c.crop_pct,
                             interpolation=c.dataset_interpolation, backend="torchvision", num_threads=0,
                             shard_id=ctx.rank, num_shards=ctx.world_size)
        mine = collect_shard_outputs(net, loader)
        sizes = ctx.all_gather_object(int(mine.targets.numel()))
        gathered = gather_outputs(ctx, mine)
        if ctx.is_main:
            torch.save({"indices": gathered.indices, "targets": gathered.targets, "preds": gathered.preds,
                        "max_probs": gathered.max_probs, "shard_sizes": sizes}, dump)
        ctx.barrier()
    finally:
        ctx.close()
    return 0


def _train_worker(argv: list) -> int:
    """gfnet-train, with a real fault when asked: on the first attempt (TORCHELASTIC_RESTART_COUNT=0) rank
    GFNET_TEST_KILL_RANK sends itself SIGKILL before its step GFNET_TEST_KILL_STEP (0-based, counted over
    the run). Rank GFNET_TEST_PAUSE_RANK pauses after step GFNET_TEST_PAUSE_STEP for a signal from the test
    (tests/fault_runner.py's install_pause, marker GFNET_TEST_PAUSE_MARKER); with GFNET_TEST_STATUS each rank
    writes its exit status to that path + "." + rank."""
    from gfnet.cli.train import main
    from gfnet.train.trainer import Trainer

    if os.environ.get("GFNET_TEST_PAUSE_STEP"):
        sys.path.insert(0, os.path.dirname(HERE))
        from fault_runner import install_pause

        env = os.environ
        install_pause({"step": int(env["GFNET_TEST_PAUSE_STEP"]), "rank": int(env["GFNET_TEST_PAUSE_RANK"]),
                       "marker": env["GFNET_TEST_PAUSE_MARKER"]})

    kill_step = os.environ.get("GFNET_TEST_KILL_STEP")
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if kill_step is not None and first_attempt and os.environ.get("RANK") == os.environ["GFNET_TEST_KILL_RANK"]:
        real_step = Trainer.train_step

        def train_step(self, images, labels):
            if self.global_step == int(kill_step):
                with open(os.environ["GFNET_TEST_KILL_MARKER"], "w") as f:
                    f.write(f"rank {os.environ['RANK']} step {self.global_step} attempt 0\n")
                os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(60)  # never reached: SIGKILL cannot be caught
            return real_step(self, images, labels)

        Trainer.train_step = train_step
    status = main(argv)
    if os.environ.get("GFNET_TEST_STATUS"):
        with open(f"{os.environ['GFNET_TEST_STATUS']}.{os.environ['RANK']}", "w") as f:
            f.write(str(status))
    return status


def _worker_main(argv: list) -> int:
    torch.set_num_threads(1)
    if argv[0] == "gather":
        return _gather_worker(*argv[1:])
    if argv[0] == "train":
        return _train_worker(argv[1:])
    raise SystemExit(f"unknown worker {argv[0]!r}")


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
