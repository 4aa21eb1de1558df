"""Training: the three stages on a tiny model, resume, DDP on the CPU, bf16 autocast, the CLI.

Tiny everything (timm's test_efficientnet with its cascade or a GRU classifier, S=40, P=16, T=3,
batch 8) so that the file runs in about a minute on two idle cores.
"""
import os
import socket

import pytest
import torch

import gfnet
from gfnet.train import (
    TensorLoader,
    Trainer,
    TrainOptions,
    collect_rollout,
    cosine_lr,
    discount_returns,
    load_backbone_weights,
    normalise_returns,
)

S, P, T, N, CLASSES = 40, 16, 3, 8, 4


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_net(classifier=None, seed=0):
    torch.manual_seed(seed)
    return gfnet.build_model("test_efficientnet", patch_size=P, T=T, num_classes=CLASSES, classifier=classifier)


def fixed_batch(seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        x = torch.randint(0, 256, (N, 3, S, S), generator=g, dtype=torch.uint8)
    else:
        x = torch.randn(N, 3, S, S, generator=g)
    return x, torch.randint(0, CLASSES, (N,), generator=g)


def params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def seq_loss(trainer, x, y, mode="random"):
    # Training-mode batch statistics (eval-mode running averages lag behind a few large steps), the
    # same random actions every time.
    torch.manual_seed(123)
    trainer._set_modes()
    with torch.no_grad():
        return trainer.objective(x, y, mode)[0].item()


@pytest.mark.parametrize("classifier", ["cascade", "gru"])
def test_stage1_loss_finite_and_falling(classifier):
    net = tiny_net(classifier)
    trainer = Trainer(net, TrainOptions(stage=1, epochs=1, backbone_lr=0.02, fc_lr=0.02, train_global=True,
                                        progress=False))
    x, y = fixed_batch()
    before = seq_loss(trainer, x, y)
    policy = params(net.policy)
    trainer._set_modes()
    for _ in range(10):
        torch.manual_seed(123)  # the random actions of seq_loss: a fixed objective to descend
        out = trainer.train_step(x, y)
        assert torch.isfinite(out["loss"])
        assert out["correct"].shape == (T,)
    after = seq_loss(trainer, x, y)
    assert after < before
    assert same(policy, params(net.policy)), "stage 1 must not touch the policy"


def test_stage1_frozen_global_encoder_stays():
    net = tiny_net()
    trainer = Trainer(net, TrainOptions(stage=1, epochs=1, train_global=False, progress=False))
    prime = params(net.model_prime)
    x, y = fixed_batch()
    trainer._set_modes()
    assert not net.model_prime.training
    trainer.train_step(x, y)
    assert same(prime, params(net.model_prime))


def test_stage2_moves_only_the_policy():
    net = tiny_net()
    trainer = Trainer(net, TrainOptions(stage=2, epochs=1, progress=False))
    frozen = {name: params(getattr(net, name)) for name in ("model_prime", "model", "fc")}
    policy = params(net.policy)
    x, y = fixed_batch()
    trainer._set_modes()
    for _ in range(3):
        out = trainer.train_step(x, y)
        assert torch.isfinite(out["loss"])
    for name, before in frozen.items():
        assert same(before, params(getattr(net, name))), f"stage 2 changed {name}"
        assert not getattr(net, name).training
    assert not same(policy, params(net.policy)), "PPO's update did not move the policy"


def test_ppo_update_follows_the_advantage():
    """A small PPO step raises the log-probability of actions with positive returns relative to those
    with negative ones: sum(A * (logpi_new - logpi_old)) > 0 (the surrogate's first-order promise)."""
    net = tiny_net()
    trainer = Trainer(net, TrainOptions(stage=2, epochs=1, policy_lr=1e-4, entropy_coef=0.0, value_coef=0.0,
                                        progress=False))
    x, y = fixed_batch()
    net.eval()
    roll = collect_rollout(net, x, y)
    returns = torch.zeros_like(roll.rewards)
    returns[:, : N // 2] = 1.0
    returns[:, N // 2:] = -1.0
    with torch.no_grad():  # re-evaluating the rollout reproduces the collecting ("old") policy's log-probs
        logp0, _, _ = net.policy.evaluate_sequence(roll.feature_maps, roll.actions)
    assert torch.allclose(logp0, roll.logprobs, atol=1e-4)
    loss, stats = trainer.objective(roll.feature_maps, roll.actions, roll.logprobs, returns)
    trainer.ppo_optimizer.zero_grad()
    loss.backward()
    trainer.ppo_optimizer.step()
    with torch.no_grad():
        logp, _, _ = net.policy.evaluate_sequence(roll.feature_maps, roll.actions)
    assert (returns * (logp - roll.logprobs)).sum() > 0


def test_returns_discount_and_normalise():
    r = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    ret = discount_returns(r, 0.5)
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0], [0.0, 2.0]]))
    z = normalise_returns(ret)
    assert abs(z.mean().item()) < 1e-6 and abs(z.std().item() - 1) < 1e-4
    assert cosine_lr(0.1, 0, 10) == pytest.approx(0.1) and cosine_lr(0.1, 5, 10) == pytest.approx(0.05)


def test_stage3_uses_the_policy_and_trains():
    net = tiny_net()
    for stage3_actions in ("sample", "mean"):
        trainer = Trainer(net, TrainOptions(stage=3, epochs=1, backbone_lr=0.05, train_global=True,
                                            stage3_actions=stage3_actions, progress=False))
        assert trainer.action_mode == stage3_actions
        x, y = fixed_batch()
        policy = params(net.policy)
        before = seq_loss(trainer, x, y, "mean")
        for _ in range(8):
            assert torch.isfinite(trainer.train_step(x, y)["loss"])
        assert seq_loss(trainer, x, y, "mean") < before
        assert same(policy, params(net.policy))


def test_bf16_autocast_on_cpu():
    net = tiny_net()
    trainer = Trainer(net, TrainOptions(stage=1, epochs=1, amp="bf16", channels_last=True, progress=False))
    x, y = fixed_batch(dtype=torch.uint8)
    trainer._set_modes()
    seen = []
    hook = net.model.register_forward_hook(lambda m, i, o: seen.append(o[0].dtype))
    for _ in range(2):
        assert torch.isfinite(trainer.train_step(x, y)["loss"])
    hook.remove()
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    net.eval()
    trainer2 = Trainer(tiny_net(), TrainOptions(stage=2, epochs=1, amp="bf16", progress=False))
    trainer2._set_modes()
    assert torch.isfinite(trainer2.train_step(x, y)["loss"])


def _loader(seed=3, n=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, S, S), generator=g, dtype=torch.uint8)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return TensorLoader(x, y, N, train=True, seed=seed), TensorLoader(x[:16], y[:16], 16, train=False)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_reproduces_uninterrupted_run(tmp_path, stage):
    opts = TrainOptions(stage=stage, epochs=3, backbone_lr=0.05, train_global=True, progress=False, seed=7)
    train, val = _loader()
    straight = Trainer(tiny_net(seed=0), opts, out_dir=str(tmp_path / "a"))
    straight.fit(train, val)

    def stop_after_first(trainer, record):
        if record["epoch"] == 1:
            raise Interrupt

    killed = Trainer(tiny_net(seed=0), opts, out_dir=str(tmp_path / "b"))
    with pytest.raises(Interrupt):
        killed.fit(train, val, callbacks=[stop_after_first])
    # a new process: a differently initialised model and generator, restored from the file
    torch.manual_seed(999)
    resumed = Trainer(tiny_net(seed=1), opts, out_dir=str(tmp_path / "b"))
    resumed.fit(train, val, resume=str(tmp_path / "b" / "checkpoint.pth.tar"))
    assert resumed.epoch == straight.epoch == 3
    assert same(params(straight.net), params(resumed.net))
    opt_a = (straight.optimizer or straight.ppo_optimizer).state_dict()["state"]
    opt_b = (resumed.optimizer or resumed.ppo_optimizer).state_dict()["state"]
    for k in opt_a:
        for name in opt_a[k]:
            assert torch.equal(torch.as_tensor(opt_a[k][name]), torch.as_tensor(opt_b[k][name]))
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in resumed.history]
    # the checkpoint is the reference's format and loads as a GFNet
    net = gfnet.load_checkpoint(str(tmp_path / "b" / "checkpoint.pth.tar"))
    assert same(params(net.fc), params(resumed.net.fc))
    assert os.path.getsize(tmp_path / "b" / "train.log") > 0


def test_resume_refuses_other_stage(tmp_path):
    train, _ = _loader()
    t = Trainer(tiny_net(), TrainOptions(stage=1, epochs=1, progress=False), out_dir=str(tmp_path))
    t.fit(train)
    other = Trainer(tiny_net(), TrainOptions(stage=3, epochs=1, progress=False))
    with pytest.raises(ValueError, match="stage 1 \\(checkpoint\\) vs 3"):
        other.load_training_state(str(tmp_path / "checkpoint.pth.tar"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, stage, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from gfnet.train import init_distributed

    ctx = init_distributed("cpu")
    try:
        net = tiny_net(seed=rank)  # different initialisations: DDP must broadcast rank 0's
        g = torch.Generator().manual_seed(11)
        x = torch.randint(0, 256, (32, 3, S, S), generator=g, dtype=torch.uint8)
        y = torch.randint(0, CLASSES, (32,), generator=g)
        loader = TensorLoader(x, y, 4, train=True, seed=2, shard_id=ctx.rank, num_shards=ctx.world_size)
        trainer = Trainer(net, TrainOptions(stage=stage, epochs=1, backbone_lr=0.05, train_global=True,
                                            progress=False), ctx=ctx)
        stats = trainer.train_epoch(loader, 0)
        torch.save({"params": params(net), "images": stats["images"]}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("stage", [1, 2])
def test_ddp_two_processes_gloo(tmp_path, stage):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), stage, str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    trained = "policy." if stage == 2 else "model."
    for k, v in a["params"].items():
        if k.startswith(trained) and "running" not in k and "num_batches" not in k:
            assert torch.equal(v, b["params"][k]), f"{k} differs between ranks"
    assert a["images"] == b["images"] == 32  # statistics summed over both shards
    fresh = params(tiny_net(seed=0))
    assert any(not torch.equal(a["params"][k], fresh[k]) for k in a["params"] if k.startswith(trained))


def test_backbone_weights_with_module_prefix(tmp_path):
    net = tiny_net()
    src = tiny_net(seed=5).model.net.state_dict()
    src = {"module." + k: v for k, v in src.items() if not k.startswith("classifier.")}
    torch.save({"state_dict": src}, tmp_path / "w.pth")
    info = load_backbone_weights(net.model_prime, str(tmp_path / "w.pth"))
    assert "classifier.weight" in info["missing"]
    got = net.model_prime.net.state_dict()
    assert all(torch.equal(got[k[len("module."):]], v) for k, v in src.items())
    torch.save({"conv_stem.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not fit"):
        load_backbone_weights(net.model, str(tmp_path / "bad.pth"))


def test_cli_train_stage1_then_2_on_sample_tree(tmp_path):
    from gfnet.cli.train import main
    from gfnet.data.sample import make_sample_tree

    root = tmp_path / "data"
    make_sample_tree(str(root), num_classes=2, train_per_class=4, val_per_class=2, photo_size=(48, 40))
    common = ["--data", str(root), "--arch", "test_efficientnet", "--patch-size", "16", "--T", "2",
              "--batch-size", "4", "--epochs", "1", "--backend", "torchvision", "--workers", "0",
              "--no-progress", "--device", "cpu"]
    assert main(common + ["--stage", "1", "--out", str(tmp_path / "s1"), "--train-global", "yes"]) == 0
    ckpt = tmp_path / "s1" / "checkpoint.pth.tar"
    assert main(common + ["--stage", "2", "--checkpoint", str(ckpt), "--out", str(tmp_path / "s2")]) == 0
    net = gfnet.load_checkpoint(str(tmp_path / "s2" / "checkpoint.pth.tar"))
    assert net.T == 2 and net.meta.anytime_classification is not None
    assert main(common + ["--stage", "2", "--out", str(tmp_path / "s3")]) == 2  # no checkpoint: a clear error


def test_channels_last_is_the_default_and_can_be_turned_off():
    from gfnet.cli.train import build_parser

    conv_weights = lambda net: [m.weight for m in net.model.modules() if isinstance(m, torch.nn.Conv2d)]  # noqa: E731
    net = tiny_net()
    Trainer(net, TrainOptions(stage=1, epochs=1, progress=False))
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(net))
    assert any(not w.is_contiguous() for w in conv_weights(net))
    net = tiny_net()
    Trainer(net, TrainOptions(stage=1, epochs=1, progress=False, channels_last=False))
    assert all(w.is_contiguous() for w in conv_weights(net))
    base = ["--data", "d", "--arch", "resnet18", "--stage", "1", "--out", "o"]
    assert build_parser().parse_args(base).channels_last is True
    assert build_parser().parse_args(base + ["--no-channels-last"]).channels_last is False
