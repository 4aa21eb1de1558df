"""Moving training runs between gfnet and the reference's train.py, both ways, at every stage.

The reference side is stated here from its train.py (facts, not its code): bare backbones, its
``Full_layer`` and ``ActorCritic`` (from reference_oracle, which imports no gfnet model code), an SGD
over ``[model, model_prime (families that train it), fc]`` with each module's whole ``parameters()``,
PPO's ``Adam(policy.parameters(), lr=3e-4, betas=(0.9, 0.999))`` in stages 2 and 3, strict
``load_state_dict`` of un-prefixed dicts, and the fields its ``save_checkpoint`` call writes.

Tiny models: timm's test_efficientnet (cascade classifier; the family freezes the global encoder, so
SGD has 2 groups) and test_resnet (GRU classifier; trains the global encoder: 3 groups), S=40, P=16,
T=3 (so the cascade's fc_4/fc_5 never see data, as in a reference run with T=3).
"""
import copy
import logging

import pytest
import timm
import torch
import torch.nn as nn

import gfnet
from gfnet.checkpoint import CheckpointError, pycls_to_timm, read_checkpoint, reference_parameter_order, timm_to_pycls
from gfnet.train import TensorLoader, Trainer, TrainOptions, build_training_model
from gfnet.train.weights import reset_policy

from reference_oracle import ActorCritic, Full_layer

S, P, T, N, CLASSES = 40, 16, 3, 8, 4
ARCHS = {"test_efficientnet": "cascade", "test_resnet": "gru"}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_net(arch="test_efficientnet", seed=0):
    torch.manual_seed(seed)
    return gfnet.build_model(arch, patch_size=P, T=T, num_classes=CLASSES)


def loaders(seed=3, n=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, S, S), generator=g, dtype=torch.uint8)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return TensorLoader(x, y, N, train=True, seed=seed), TensorLoader(x, y, n, train=False)


def options(stage, **kw):
    return TrainOptions(stage=stage, epochs=kw.pop("epochs", 1), progress=False, seed=5, **kw)


# ----------------------------------------------------------------------------- the reference side
class ReferenceRun:
    """What the reference's train.py builds for ``stage``: bare backbones, Full_layer, PPO's
    ActorCritic and the optimisers, in its construction order."""

    def __init__(self, arch, stage, seed=0):
        config = gfnet.get_config(arch, ARCHS[arch])
        torch.manual_seed(seed)
        self.stage, self.config = stage, config
        self.model = timm.create_model(arch, num_classes=CLASSES)
        self.model_prime = timm.create_model(arch, num_classes=CLASSES)
        self.fc = Full_layer(config.feature_num, config.fc_hidden_dim or 1024, config.fc_rnn, CLASSES)
        self.train_prime = config.train.train_model_prime
        self.optimizer = self.policy = self.ppo_optimizer = None
        if stage != 2:
            groups = [{"params": self.model.parameters()}]
            if self.train_prime:
                groups.append({"params": self.model_prime.parameters()})
            groups.append({"params": self.fc.parameters()})
            self.optimizer = torch.optim.SGD(groups, lr=0, momentum=0.9, nesterov=True, weight_decay=1e-4)
        if stage != 1:
            state_dim = config.feature_map_channels * ((P + 31) // 32) ** 2
            self.policy = ActorCritic(config.feature_map_channels, state_dim, config.policy_hidden_dim,
                                      config.policy_conv)
            self.ppo_optimizer = torch.optim.Adam(self.policy.parameters(), lr=3e-4, betas=(0.9, 0.999))

    def named_optimizer_params(self):
        """[(name, Parameter)] in SGD order, names as gfnet's net.named_parameters() spells them."""
        out = [(f"model.net.{n}", p) for n, p in self.model.named_parameters()]
        if self.train_prime:
            out += [(f"model_prime.net.{n}", p) for n, p in self.model_prime.named_parameters()]
        return out + [(f"fc.{n}", p) for n, p in self.fc.named_parameters()]

    def step(self):
        """An optimisation step of the stage: gradients for what the stage trains (the cascade's heads
        beyond fc_T get none, as in a run with T steps), then the optimiser's step."""
        if self.optimizer is not None:
            for name, p in self.named_optimizer_params():
                if name.startswith("fc.fc_") and int(name.split(".")[1].split("_")[1]) > T:
                    continue
                p.grad = torch.randn_like(p) * 0.01
            self.optimizer.step()
        if self.stage == 2:
            for p in self.policy.parameters():
                p.grad = torch.randn_like(p) * 0.01
            self.ppo_optimizer.step()

    def save(self, path, epoch=2, acc=12.5, best_acc=20.0, prefix=""):
        """The dict train.py's save_checkpoint call writes (``prefix="module."`` for the variant with
        nn.DataParallel's prefix)."""
        def pre(state):
            return {prefix + k: v for k, v in state.items()}

        torch.save({
            "epoch": epoch, "model_state_dict": pre(self.model.state_dict()),
            "model_prime_state_dict": pre(self.model_prime.state_dict()), "fc": self.fc.state_dict(),
            "acc": acc, "best_acc": best_acc,
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "ppo_optimizer": self.ppo_optimizer.state_dict() if self.ppo_optimizer else None,
            "policy": self.policy.state_dict() if self.policy else None,
        }, path)

    def load_stage_start(self, ckpt):
        """train.py with --checkpoint_path (stages 2, 3)."""
        self.model.load_state_dict(ckpt["model_state_dict"])
        self.model_prime.load_state_dict(ckpt["model_prime_state_dict"])
        self.fc.load_state_dict(ckpt["fc"])
        if self.stage == 3:
            self.policy.load_state_dict(ckpt["policy"])

    def load_resume(self, ckpt):
        """train.py with --resume: returns (start_epoch, best_acc)."""
        self.model.load_state_dict(ckpt["model_state_dict"])
        self.model_prime.load_state_dict(ckpt["model_prime_state_dict"])
        self.fc.load_state_dict(ckpt["fc"])
        if self.optimizer:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.policy is not None:
            self.policy.load_state_dict(ckpt["policy"])
            self.ppo_optimizer.load_state_dict(ckpt["ppo_optimizer"])
        return ckpt["epoch"], ckpt["best_acc"]


def ref_weights(ref):
    out = {f"model.net.{k}": v for k, v in ref.model.state_dict().items()}
    out.update({f"model_prime.net.{k}": v for k, v in ref.model_prime.state_dict().items()})
    out.update({f"fc.{k}": v for k, v in ref.fc.state_dict().items()})
    if ref.policy is not None:
        out.update({f"policy.{k}": v for k, v in ref.policy.state_dict().items()})
    return out


def assert_same_weights(ref, net, policy=True):
    ours = net.state_dict()
    theirs = ref_weights(ref)
    if not policy:
        theirs = {k: v for k, v in theirs.items() if not k.startswith("policy.")}
    assert theirs, "nothing compared"
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k


def assert_same_sgd_state(ref, trainer):
    """Every parameter's momentum buffer is the same on both sides (matched by name), and parameters
    without state on one side have none on the other."""
    ours = dict(trainer.net.named_parameters())
    own_state = trainer.optimizer.state
    compared = 0
    for name, p in ref.named_optimizer_params():
        theirs = ref.optimizer.state.get(p, {})
        mine = own_state.get(ours[name], {})
        assert set(theirs) == set(mine), name
        for key in theirs:
            assert torch.equal(torch.as_tensor(theirs[key]), torch.as_tensor(mine[key])), (name, key)
            compared += 1
    assert compared > 0
    momenta = [g["momentum"] for g in trainer.optimizer.param_groups]
    assert [g["momentum"] for g in ref.optimizer.param_groups] == momenta


def assert_same_adam_state(ref, trainer):
    ours = list(trainer.net.policy.parameters())
    theirs = list(ref.policy.parameters())
    assert len(ours) == len(theirs)
    for a, b in zip(theirs, ours):
        sa, sb = ref.ppo_optimizer.state[a], trainer.ppo_optimizer.state[b]
        assert set(sa) == set(sb) == {"step", "exp_avg", "exp_avg_sq"}
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), key


# ----------------------------------------------------------------------------- reference -> gfnet
@pytest.mark.parametrize("prefix", ["", "module."])
def test_reference_stage1_file_loads_with_caller_values(tmp_path, prefix):
    ref = ReferenceRun("test_efficientnet", 1)
    ref.step()
    path = tmp_path / "checkpoint.pth.tar"
    ref.save(path, prefix=prefix)
    with pytest.raises(CheckpointError, match=r"does not say its backbone.*pass --arch"):
        gfnet.load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"does not say its patch size.*pass --patch-size"):
        gfnet.load_checkpoint(path, arch="test_efficientnet")
    with pytest.raises(CheckpointError, match=r"sequence length T.*fc_2..fc_5 fits any T <= 5.*pass --T"):
        gfnet.load_checkpoint(path, arch="test_efficientnet", patch_size=P)
    with pytest.raises(CheckpointError, match=r"'model_prime_state_dict' do not fit backbone 'test_resnet'"):
        gfnet.load_checkpoint(path, arch="test_resnet", patch_size=P, T=T)
    with pytest.raises(CheckpointError, match="heads fc_2..fc_5, which does not fit T=6"):
        gfnet.load_checkpoint(path, arch="test_efficientnet", patch_size=P, T=6)
    net = gfnet.load_checkpoint(path, arch="test_efficientnet", patch_size=P, T=T)
    assert (net.arch, net.patch_size, net.T, net.num_classes) == ("test_efficientnet", P, T, CLASSES)
    assert_same_weights(ref, net)
    assert net.meta.trained_policy is False and net.meta.epoch == 2
    assert "optimizer" not in net.meta.as_dict()  # optimiser states stay in the file, not on the model
    ckpt = read_checkpoint(path, arch="test_efficientnet", patch_size=P, T=T)
    assert (ckpt.origin, ckpt.stage, ckpt.prefixed) == ("reference-train", 1, prefix == "module.")


def test_stage1_initialisations_from_a_gfnet_checkpoint_take_each_encoder(tmp_path):
    ref = ReferenceRun("test_resnet", 1, seed=3)
    with torch.no_grad():
        for p in ref.model_prime.parameters():
            p.add_(1.0)  # the two encoders differ
    ref.save(tmp_path / "s1.pth.tar", prefix="module.")
    path = str(tmp_path / "s1.pth.tar")
    net = build_training_model("test_resnet", P, T, 1, num_classes=CLASSES, init_global=path, init_local=path)
    for k, v in ref.model.state_dict().items():
        assert torch.equal(net.model.net.state_dict()[k], v), k
    for k, v in ref.model_prime.state_dict().items():
        assert torch.equal(net.model_prime.net.state_dict()[k], v), k


def test_caller_values_that_contradict_the_file_are_named(tmp_path):
    net = tiny_net()
    path = tmp_path / "g.pth.tar"
    gfnet.save_checkpoint(net, path)
    with pytest.raises(CheckpointError, match=r"backbone 'test_efficientnet', but --arch 'test_resnet'"):
        gfnet.load_checkpoint(path, arch="test_resnet")
    with pytest.raises(CheckpointError, match=r"patch size 16, but --patch-size 64"):
        gfnet.load_checkpoint(path, patch_size=64)
    with pytest.raises(CheckpointError, match=r"sequence length T 3, but --T 4"):
        gfnet.load_checkpoint(path, T=4)
    # a reference file with a policy: a patch size that the policy's input cannot come from is named
    ref = ReferenceRun("test_efficientnet", 2)
    ref.save(tmp_path / "s2.pth.tar")
    with pytest.raises(CheckpointError, match="patch size of 96 gives 3x3: is --patch-size right"):
        gfnet.load_checkpoint(tmp_path / "s2.pth.tar", arch="test_efficientnet", patch_size=96, T=T)
    # T is read off a cascade with more heads than the reference's four
    big = gfnet.build_model("test_efficientnet", patch_size=P, T=7, num_classes=CLASSES)
    ckpt = torch.load(path, weights_only=True)
    ckpt["fc"] = big.fc.state_dict()
    for k in ("T", "flops", "model_name", "patch_size", "gfnet_version"):
        ckpt.pop(k)
    torch.save(ckpt, tmp_path / "t7.pth.tar")
    assert gfnet.load_checkpoint(tmp_path / "t7.pth.tar", arch="test_efficientnet", patch_size=P).T == 7


def test_reference_stage1_file_starts_stage2_with_a_fresh_policy_and_refuses_stage3(tmp_path, caplog):
    ref = ReferenceRun("test_efficientnet", 1)
    ref.step()
    ref.save(tmp_path / "s1.pth.tar")
    net = build_training_model("test_efficientnet", P, T, 2, checkpoint=str(tmp_path / "s1.pth.tar"))
    assert_same_weights(ref, net)
    with pytest.raises(ValueError, match="continue_policy.*has none"):
        Trainer(net, options(2, continue_policy=True))
    trainer = Trainer(net, options(2))
    fresh = tiny_net(seed=123)
    reset_policy(fresh, 5)
    assert all(torch.equal(a, b) for a, b in zip(net.policy.state_dict().values(), fresh.policy.state_dict().values()))
    net3 = build_training_model("test_efficientnet", P, T, 3, checkpoint=str(tmp_path / "s1.pth.tar"))
    with pytest.raises(ValueError, match="stage 3 fine-tunes with the policy that stage 2 trained"):
        Trainer(net3, options(3))
    # stage 2 runs and its checkpoint then holds a trained policy
    train, val = loaders()
    with caplog.at_level(logging.INFO, logger="gfnet.train"):
        trainer.out_dir = str(tmp_path / "s2")
        trainer.fit(train, val)
    assert "freshly initialised (seed 5)" in caplog.text
    assert read_checkpoint(tmp_path / "s2" / "checkpoint.pth.tar").trained_policy


def test_stage2_policy_fresh_by_default_or_continued_on_request():
    net = tiny_net(seed=0)
    with torch.no_grad():
        for p in net.policy.parameters():
            p.add_(1.0)  # a "trained" policy
    before = {k: v.clone() for k, v in net.policy.state_dict().items()}
    kept = copy.deepcopy(net)
    Trainer(kept, options(2, continue_policy=True))
    assert all(torch.equal(before[k], v) for k, v in kept.policy.state_dict().items())
    reset = copy.deepcopy(net)
    Trainer(reset, options(2))
    assert not any(torch.equal(before[k], v) for k, v in reset.policy.state_dict().items() if v.numel() > 1)
    # the fresh policy is a newly built one's: same distribution as at construction, fixed by the seed
    again = copy.deepcopy(net)
    Trainer(again, options(2))
    assert all(torch.equal(a, b)
               for a, b in zip(reset.policy.state_dict().values(), again.policy.state_dict().values()))


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_a_reference_run(tmp_path, arch, stage):
    """A reference train.py resume file continues in gfnet with the same weights, optimiser state and
    epoch, and gfnet trains on from there."""
    ref = ReferenceRun(arch, stage, seed=1)
    for _ in range(2):
        ref.step()
    path = tmp_path / "checkpoint.pth.tar"
    ref.save(path, epoch=2, best_acc=33.0)
    net = gfnet.load_checkpoint(path, arch=arch, patch_size=P, T=T) if stage != 1 else tiny_net(arch, seed=9)
    train_global = ref.train_prime
    trainer = Trainer(net, options(stage, epochs=3, train_global=train_global, backbone_lr=0.01),
                      out_dir=str(tmp_path / "gf"))
    trainer.load_training_state(str(path))
    assert trainer.epoch == 2 and trainer.best_acc == 33.0 and trainer.history == []
    assert_same_weights(ref, trainer.net, policy=stage != 1)
    if stage != 2:
        assert_same_sgd_state(ref, trainer)
        assert [g["name"] for g in trainer.optimizer.param_groups] == (
            ["model", "model_prime", "fc"] if train_global else ["model", "fc"])
        assert all("base_lr" in g for g in trainer.optimizer.param_groups)
    else:
        assert_same_adam_state(ref, trainer)
    train, val = loaders()
    history = trainer.fit(train, val)
    assert [h["epoch"] for h in history] == [3]
    # a stage of another kind is refused by name
    other = 1 if stage != 1 else 3
    with pytest.raises(ValueError, match=f"stage-{stage} run; this one is stage {other}"):
        Trainer(tiny_net(arch), options(other, train_global=train_global)).load_training_state(str(path))


def test_resume_refuses_a_release_file(tmp_path):
    path = tmp_path / "release.pth.tar"
    gfnet.save_checkpoint(tiny_net(), path)
    with pytest.raises(ValueError, match="holds no training state"):
        Trainer(tiny_net(), options(1)).load_training_state(str(path))


# ----------------------------------------------------------------------------- gfnet -> reference
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_reference_train_layout_continues_in_the_reference(tmp_path, arch, stage):
    net = tiny_net(arch, seed=2)
    train_global = gfnet.get_config(arch, ARCHS[arch]).train.train_model_prime
    trainer = Trainer(net, options(stage, train_global=train_global, save_layout="reference-train"),
                      out_dir=str(tmp_path))
    train, val = loaders()
    trainer.fit(train, val)
    path = tmp_path / "checkpoint.pth.tar"
    ckpt = torch.load(path, weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model_state_dict"])
    assert (ckpt["policy"] is None) == (stage == 1)
    assert (ckpt["optimizer"] is None) == (stage == 2)
    assert (ckpt["ppo_optimizer"] is None) == (stage == 1)
    assert ckpt["epoch"] == 1 and ckpt["best_acc"] == trainer.best_acc
    assert ckpt["train_state"]["options"]["save_layout"] == "reference-train"

    # the next stage of train.py starts from it (--checkpoint_path): strict loads into bare modules
    if stage != 3:
        nxt = ReferenceRun(arch, stage + 1, seed=7)
        nxt.load_stage_start(ckpt)  # stage 3 loads the policy, stage 2 keeps its fresh one
        assert_same_weights(nxt, net, policy=stage == 2)
    # train.py --resume continues it: optimisers built its way take the states, and step
    ref = ReferenceRun(arch, stage, seed=8)
    epoch, best = ref.load_resume(ckpt)
    assert epoch == 1 and best == trainer.best_acc
    assert_same_weights(ref, net, policy=stage != 1)
    if stage != 2:
        assert_same_sgd_state(ref, trainer)
    else:
        assert_same_adam_state(ref, trainer)
    ref.step()  # the loaded states fit the parameters they index
    if stage == 3:
        assert ref.ppo_optimizer.state_dict()["state"] == {}  # its stage-3 Adam never stepped
    if stage == 2:  # Adam's step counts are numbers, as the PyTorch of the reference's time keeps them
        assert all(isinstance(s["step"], int) and s["step"] == 2 for s in ckpt["ppo_optimizer"]["state"].values())

    # and gfnet reads its own reference-train file back (no --arch needed: it names its backbone)
    again = Trainer(tiny_net(arch, seed=4) if stage == 1 else gfnet.load_checkpoint(path),
                    options(stage, epochs=2, train_global=train_global, save_layout="reference-train"))
    again.load_training_state(str(path))
    for k, v in net.state_dict().items():
        if stage != 1 or not k.startswith("policy."):
            assert torch.equal(v, again.net.state_dict()[k]), k
    if stage != 2:
        for (name, a), b in zip(trainer.net.named_parameters(), again.net.parameters()):
            sa, sb = trainer.optimizer.state.get(a, {}), again.optimizer.state.get(b, {})
            assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_resume_from_own_reference_train_file_reproduces_the_run(tmp_path):
    opts = options(1, epochs=3, backbone_lr=0.05, train_global=False, save_layout="reference-train")
    train, val = loaders()
    straight = Trainer(tiny_net(seed=0), opts, out_dir=str(tmp_path / "a"))
    straight.fit(train, val)

    class Stop(Exception):
        pass

    def stop(trainer, record):
        if record["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        Trainer(tiny_net(seed=0), opts, out_dir=str(tmp_path / "b")).fit(train, val, callbacks=[stop])
    torch.manual_seed(999)
    resumed = Trainer(tiny_net(seed=1), opts, out_dir=str(tmp_path / "b"))
    resumed.fit(train, val, resume=str(tmp_path / "b" / "checkpoint.pth.tar"))
    # stage 1 of this layout stores no policy (the reference's "policy: None"): the rest is the same
    assert all(torch.equal(v, resumed.net.state_dict()[k]) for k, v in straight.net.state_dict().items()
               if not k.startswith("policy."))
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in resumed.history]


def test_reference_train_layout_needs_the_reference_optimizer_groups():
    # test_efficientnet's family freezes the global encoder in the reference: 2 SGD groups only
    with pytest.raises(ValueError, match="needs train_global=False"):
        Trainer(tiny_net(), options(1, train_global=True, save_layout="reference-train"))


# ----------------------------------------------------------------------------- RegNet parameter order
class _PyclsBlock(nn.Module):
    """A pycls ResBottleneckBlock's module tree (anynet.py): proj, bn, then f = (a, a_bn, b, b_bn, se,
    c, c_bn), built around the layers of a timm RegNet block so that the shapes agree."""

    def __init__(self, tb):
        super().__init__()
        if not isinstance(tb.downsample, nn.Identity) and tb.downsample is not None:
            self.proj = copy.deepcopy(tb.downsample.conv)
            self.bn = copy.deepcopy(tb.downsample.bn)
        self.f = nn.Module()
        self.f.a, self.f.a_bn = copy.deepcopy(tb.conv1.conv), copy.deepcopy(tb.conv1.bn)
        self.f.b, self.f.b_bn = copy.deepcopy(tb.conv2.conv), copy.deepcopy(tb.conv2.bn)
        self.f.se = nn.Module()
        self.f.se.f_ex = nn.Sequential(copy.deepcopy(tb.se.fc1), nn.ReLU(), copy.deepcopy(tb.se.fc2), nn.Sigmoid())
        self.f.c, self.f.c_bn = copy.deepcopy(tb.conv3.conv), copy.deepcopy(tb.conv3.bn)


def test_regnet_keys_and_optimizer_order_are_pycls_ones():
    net = gfnet.build_model("regnety_600m", patch_size=96, T=2, num_classes=CLASSES)
    t = net.model.net
    pycls = nn.Module()
    pycls.stem = nn.Module()
    pycls.stem.conv, pycls.stem.bn = copy.deepcopy(t.stem.conv), copy.deepcopy(t.stem.bn)
    for s in ("s1", "s2", "s3", "s4"):
        stage = nn.Module()
        for b, tb in getattr(t, s).named_children():
            stage.add_module(b, _PyclsBlock(tb))
        pycls.add_module(s, stage)
    pycls.fc = copy.deepcopy(t.head.fc)
    # the key table maps our names onto pycls's exactly, and back
    ours = t.state_dict()
    assert list(timm_to_pycls(ours)) != list(pycls.state_dict())  # same names, another order
    assert sorted(timm_to_pycls(ours)) == sorted(pycls.state_dict())
    assert list(pycls_to_timm(timm_to_pycls(ours))) == list(ours)
    # reference_parameter_order is pycls's parameters() order: what train.py's SGD indexes by
    order = [n for n in timm_to_pycls({k: None for k in reference_parameter_order(net.model)})]
    assert order == [n for n, _ in pycls.named_parameters()]


# ----------------------------------------------------------------------------- transforms
def test_transforms_option_recorded_in_checkpoint_and_log(tmp_path, caplog):
    b2 = gfnet.get_config("efficientnet_b2")
    ref, own = b2.train_transforms("reference"), b2.train_transforms("backbone")
    assert (ref.image_size, int(ref.image_size / ref.crop_pct), ref.interpolation) == (224, 256, "bilinear")
    assert (own.image_size, own.interpolation) == (260, "bicubic")
    assert gfnet.get_config("efficientnet_b3").train_transforms("backbone").image_size == 300
    assert gfnet.get_config("resnet50").train_transforms("backbone").image_size == 224
    with pytest.raises(ValueError, match="transforms must be one of"):
        Trainer(tiny_net(), options(1, transforms="inference"))
    train, _ = loaders()
    for kind in ("reference", "backbone"):
        with caplog.at_level(logging.INFO, logger="gfnet.train"):
            trainer = Trainer(tiny_net(), options(1, transforms=kind), out_dir=str(tmp_path / kind))
            trainer.fit(train)
        state = torch.load(tmp_path / kind / "checkpoint.pth.tar", weights_only=True)["train_state"]
        assert state["options"]["transforms"] == kind and state["train_transforms"]["name"] == kind
        assert f"data transforms {kind!r}" in caplog.text


# ----------------------------------------------------------------------------- the command line
def test_cli_continues_a_reference_stage1_file_and_resumes_its_own(tmp_path, capsys):
    from gfnet.cli.eval import main as eval_main
    from gfnet.cli.train import main
    from gfnet.data.sample import make_sample_tree

    root = tmp_path / "data"
    make_sample_tree(str(root), num_classes=2, train_per_class=4, val_per_class=2, photo_size=(48, 40))
    ref = ReferenceRun("test_efficientnet", 1)
    ref.fc = Full_layer(ref.config.feature_num, 1024, False, 2)  # the sample tree has 2 classes
    ref.model = timm.create_model("test_efficientnet", num_classes=2)
    ref.model_prime = timm.create_model("test_efficientnet", num_classes=2)
    ref.optimizer = torch.optim.SGD([{"params": ref.model.parameters()}, {"params": ref.fc.parameters()}], lr=0,
                                    momentum=0.9, nesterov=True)
    ref.save(tmp_path / "s1.pth.tar", epoch=30)
    common = ["--data", str(root), "--batch-size", "4", "--backend", "torchvision", "--workers", "0",
              "--no-progress", "--device", "cpu", "--no-val"]
    s2 = ["--stage", "2", "--checkpoint", str(tmp_path / "s1.pth.tar"), "--out", str(tmp_path / "s2")]
    assert main(common + s2 + ["--epochs", "1"]) == 2
    assert "pass --arch" in capsys.readouterr().err
    given = ["--arch", "test_efficientnet", "--patch-size", "16", "--T", "2"]
    assert main(common + s2 + given + ["--epochs", "1", "--save-layout", "reference-train"]) == 0
    out = tmp_path / "s2" / "checkpoint.pth.tar"
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["optimizer"] is None and ckpt["ppo_optimizer"] is not None and ckpt["epoch"] == 1
    # --resume alone continues it (the file names its backbone); a second epoch follows
    assert main(common + ["--stage", "2", "--resume", str(out), "--out", str(tmp_path / "s2"), "--epochs", "2",
                          "--save-layout", "reference-train"]) == 0
    assert torch.load(out, weights_only=True)["epoch"] == 2
    # gfnet-eval reads the reference's file given the values it lacks
    assert eval_main(["--checkpoint", str(tmp_path / "s1.pth.tar"), "--eval-mode", "0"]) == 0
    assert "model_arch: None" in capsys.readouterr().out
    assert eval_main(["--checkpoint", str(tmp_path / "s1.pth.tar"), "--eval-mode", "0",
                      "--arch", "test_efficientnet"]) == 0
    assert "model_arch: test_efficientnet" in capsys.readouterr().out
