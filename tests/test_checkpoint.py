"""Reference-format checkpoints: key layouts, and outputs equal to the reference's inference loop."""
import math

import pytest
import torch

import gfnet
from gfnet.checkpoint import CheckpointError, pycls_to_timm, timm_to_pycls

from helpers import randomise_batchnorm
from reference_oracle import reference_anytime

# Patch sizes and T as in the released checkpoints (README of the reference).
CASES = [
    ("resnet50", 96, 5),
    ("densenet121", 96, 3),
    ("regnety_600m", 96, 5),
    ("mobilenetv3_large_100", 96, 3),
    ("efficientnet_b2", 128, 4),
]

# Keys every released checkpoint of that backbone has, as its documented format names them.
EXPECTED_ENCODER_KEYS = {
    "resnet50": ["module.conv1.weight", "module.bn1.running_var", "module.layer1.0.conv1.weight",
                 "module.layer4.2.bn3.weight", "module.layer1.0.downsample.0.weight", "module.fc.weight"],
    "densenet121": ["module.features.conv0.weight", "module.features.denseblock1.denselayer1.norm1.weight",
                    "module.features.transition1.conv.weight", "module.features.norm5.weight",
                    "module.classifier.weight"],
    "regnety_600m": ["module.stem.conv.weight", "module.stem.bn.weight", "module.s1.b1.proj.weight",
                     "module.s1.b1.bn.running_mean", "module.s1.b1.f.a.weight", "module.s1.b1.f.a_bn.weight",
                     "module.s1.b1.f.b.weight", "module.s2.b2.f.se.f_ex.0.weight",
                     "module.s2.b2.f.se.f_ex.2.bias", "module.s4.b4.f.c_bn.running_var", "module.fc.weight"],
    "mobilenetv3_large_100": ["module.conv_stem.weight", "module.bn1.weight", "module.blocks.0.0.conv_dw.weight",
                              "module.blocks.2.0.se.conv_reduce.weight", "module.blocks.6.0.conv.weight",
                              "module.conv_head.weight", "module.conv_head.bias", "module.classifier.weight"],
    "efficientnet_b2": ["module.conv_stem.weight", "module.blocks.1.0.conv_pw.weight",
                        "module.blocks.1.0.se.conv_expand.bias", "module.conv_head.weight",
                        "module.bn2.running_mean", "module.classifier.weight"],
}


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return {S: torch.randn(3, 3, S, S, generator=g) for S in (224, 260)}


@pytest.mark.parametrize("arch,P,T", CASES)
def test_reference_format_and_outputs(tmp_path, images, arch, P, T):
    torch.manual_seed(1)
    net = randomise_batchnorm(gfnet.build_model(arch, patch_size=P, T=T)).eval()
    path = tmp_path / "gfnet.pth.tar"
    gfnet.save_checkpoint(net, path)
    assert [p.name for p in tmp_path.iterdir()] == ["gfnet.pth.tar"]  # atomic: no temporary left behind

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    for field in ("model_name", "patch_size", "model_prime_state_dict", "model_state_dict", "fc", "policy",
                  "model_flops", "policy_flops", "fc_flops", "flops", "anytime_classification",
                  "dynamic_threshold", "budgeted_batch_classification"):
        assert field in ckpt
    assert ckpt["model_name"] == arch and ckpt["patch_size"] == P and len(ckpt["flops"]) == T
    for key in EXPECTED_ENCODER_KEYS[arch]:
        assert key in ckpt["model_state_dict"] and key in ckpt["model_prime_state_dict"], key
    assert all(k.startswith("module.") for k in ckpt["model_state_dict"])
    fc_rnn = arch in ("resnet50", "densenet121", "regnety_600m")
    fc_keys = ({"rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0", "fc.weight", "fc.bias"}
               if fc_rnn else {f"fc_{k}.{p}" for k in (2, 3, 4, 5) for p in ("weight", "bias")})
    assert set(ckpt["fc"]) == fc_keys
    enc = "state_encoder.0.weight" if fc_rnn and arch != "regnety_600m" else "state_encoder.3.weight"
    assert enc in ckpt["policy"] and "gru.weight_hh_l0" in ckpt["policy"]
    assert {"actor.0.weight", "actor.0.bias", "critic.0.weight", "critic.0.bias"} <= set(ckpt["policy"])
    flops = ckpt["flops"]
    assert all(b > a for a, b in zip(flops, flops[1:]))

    x = images[260 if arch == "efficientnet_b2" else 224]
    ref_probs, ref_actions = reference_anytime(ckpt, x)
    ours = gfnet.load_checkpoint(path).anytime_predict(x)
    assert ours.probs.shape == (T, x.shape[0], 1000)
    torch.testing.assert_close(ours.probs, ref_probs, rtol=1e-4, atol=1e-6)
    # The actions drive integer crops: equal to float32 rounding, and the crop corners identical.
    torch.testing.assert_close(ours.actions, ref_actions, rtol=0, atol=1e-6)
    S = x.shape[-1]
    assert torch.equal(torch.floor(ours.actions * (S - P)).int(), torch.floor(ref_actions * (S - P)).int())


def test_load_without_module_prefix_and_meta(tmp_path):
    net = gfnet.build_model("resnet18", patch_size=32, T=3, num_classes=10).eval()
    path = tmp_path / "a.pth.tar"
    gfnet.save_checkpoint(net, path, anytime_classification=[10.0, 20.0, 30.0], epoch=4)
    ckpt = torch.load(path, weights_only=True)
    for field in ("model_state_dict", "model_prime_state_dict"):
        ckpt[field] = {k[len("module."):]: v for k, v in ckpt[field].items()}
    del ckpt["T"]  # the reference's files have no T: it is len(flops)
    torch.save(ckpt, tmp_path / "b.pth.tar")
    net2 = gfnet.load_checkpoint(tmp_path / "b.pth.tar")
    assert net2.T == 3 and net2.num_classes == 10 and not net2.training
    assert net2.meta.anytime_classification == [10.0, 20.0, 30.0] and net2.meta.epoch == 4
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(net2.anytime_predict(x).probs, net.anytime_predict(x).probs, rtol=0, atol=0)


def test_regnet_name_mapping_round_trip():
    net = gfnet.build_model("regnety_600m", T=2)
    state = net.model.net.state_dict()
    pycls = timm_to_pycls(state)
    assert "s1.b1.f.se.f_ex.0.weight" in pycls and "fc.weight" in pycls and "s1.b1.proj.weight" in pycls
    assert not any(".conv1." in k or "downsample" in k or k.startswith("head.") for k in pycls)
    assert list(pycls_to_timm(pycls)) == list(state)


def test_not_a_checkpoint_errors(tmp_path):
    text = tmp_path / "notes.pth.tar"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pth.tar"):
        gfnet.load_checkpoint(text)
    plain = tmp_path / "backbone.pth"
    torch.save(gfnet.build_model("resnet18", 32, 2, 10).model.net.state_dict(), plain)
    with pytest.raises(CheckpointError, match="missing fields.*plain state dict"):
        gfnet.load_checkpoint(plain)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        gfnet.load_checkpoint(tmp_path / "absent.pth.tar")


def test_wrong_backbone_names_the_mismatching_keys(tmp_path):
    net = gfnet.build_model("resnet18", patch_size=32, T=2, num_classes=10)
    path = tmp_path / "r18.pth.tar"
    gfnet.save_checkpoint(net, path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_name"] = "resnet34"  # same key names, deeper: layer1.2.* are missing from the file
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"r18\.pth\.tar.*model_prime_state_dict.*missing keys \['layer1\.2"):
        gfnet.load_checkpoint(path)
    ckpt["model_name"] = "densenet121"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="unexpected keys"):
        gfnet.load_checkpoint(path)


def test_policy_state_dim_matches_patch_size():
    for P in (96, 128, 144):
        net = gfnet.build_model("mobilenetv3_large_100", patch_size=P, T=2, num_classes=10)
        assert net.policy.state_encoder[3].in_features == 32 * math.ceil(P / 32) ** 2


@pytest.mark.parametrize("arch,P,T", [c for c in CASES if c[0] in ("regnety_600m", "mobilenetv3_large_100")])
def test_reference_train_layout_round_trip(tmp_path, images, arch, P, T):
    """save_checkpoint(layout="reference-train") writes un-prefixed backbone dicts under the reference's
    key names; stripped of gfnet's extra fields it is a reference train.py file, which loads back given
    --arch/--patch-size/--T and computes what the original net computes."""
    torch.manual_seed(2)
    net = randomise_batchnorm(gfnet.build_model(arch, patch_size=P, T=T)).eval()
    path = tmp_path / "train.pth.tar"
    gfnet.save_checkpoint(net, path, layout="reference-train", epoch=3, best_acc=1.5)
    ckpt = torch.load(path, weights_only=True)
    keys = [k[len("module."):] for k in EXPECTED_ENCODER_KEYS[arch]]
    for field in ("model_state_dict", "model_prime_state_dict"):
        assert not any(k.startswith("module.") for k in ckpt[field])
        assert all(k in ckpt[field] for k in keys)
    assert ckpt["epoch"] == 3 and ckpt["optimizer"] is None and ckpt["policy"] is not None
    for k in ("model_name", "patch_size", "T", "num_classes", "classifier", "gfnet_version", "layout",
              "trained_policy", "model_flops", "policy_flops", "fc_flops", "flops"):
        ckpt.pop(k, None)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="pass --arch"):
        gfnet.load_checkpoint(path)
    again = gfnet.load_checkpoint(path, arch=arch, patch_size=P, T=T)
    x = images[224]
    torch.testing.assert_close(again.anytime_predict(x).probs, net.anytime_predict(x).probs, rtol=0, atol=0)
    # a net without a trained policy (loaded from a stage-1 file) is written with policy None
    again.meta.trained_policy = False
    gfnet.save_checkpoint(again, path, layout="reference-train")
    assert torch.load(path, weights_only=True)["policy"] is None
    gfnet.save_checkpoint(again, tmp_path / "release.pth.tar")
    assert torch.load(tmp_path / "release.pth.tar", weights_only=True)["policy"] is not None
