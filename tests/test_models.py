"""Models: every reference backbone builds and runs; the configuration table holds; step API contracts."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gfnet
from gfnet.config import REFERENCE_ARCHS, get_config

from helpers import randomise_batchnorm

ALL_ELEVEN = ["resnet50", "densenet121", "densenet169", "densenet201", "regnety_600m", "regnety_800m",
              "regnety_1.6g", "mobilenetv3_large_100", "mobilenetv3_large_125", "efficientnet_b2",
              "efficientnet_b3"]


def test_table_has_the_eleven_reference_backbones():
    assert sorted(REFERENCE_ARCHS) == sorted(ALL_ELEVEN)


@pytest.mark.parametrize("arch", ALL_ELEVEN)
def test_reference_backbone_forward(arch):
    cfg = get_config(arch)
    P = 96
    net = gfnet.build_model(arch, patch_size=P, T=3, num_classes=1000).eval()
    S = cfg.image_size
    x = torch.randn(1, 3, S, S)
    with torch.no_grad():
        pooled, fmap = net.model(torch.randn(1, 3, P, P))
    # The table's sizes are what the backbone really produces.
    assert pooled.shape == (1, cfg.feature_num)
    assert fmap.shape == (1, cfg.feature_map_channels, math.ceil(P / 32), math.ceil(P / 32))
    assert not fmap.requires_grad
    out = net.anytime_predict(x)
    assert out.probs.shape == (3, 1, 1000) and out.actions.shape == (2, 1, 2)
    # The glance, stated independently of gfnet's glance kernel and step code (DESIGN.md): the image resized
    # to P x P by F.interpolate(align_corners=True) with the table's interpolation, the global encoder, then
    # the backbone's own head (RegNet, MobileNet-V3, EfficientNet) or the GRU classifier from a zero state
    # (ResNet, DenseNet; the reference's Full_layer with its rnn and fc).
    with torch.no_grad():
        glance = F.interpolate(x, size=(P, P), mode=cfg.prime_interpolation, align_corners=True)
        pooled0, _ = net.model_prime(glance)
        if cfg.glance_head == "backbone":
            logits0 = net.model_prime.head(pooled0)
        else:
            hidden, _ = net.fc.rnn(pooled0.unsqueeze(0), torch.zeros(1, 1, net.fc.hidden_dim))
            logits0 = net.fc.fc(hidden[0])
    torch.testing.assert_close(out.probs[0], torch.softmax(logits0, 1), rtol=1e-4, atol=1e-6)


def test_reference_facts_of_the_table():
    assert get_config("resnet50").prime_interpolation == "bicubic"
    assert get_config("densenet121").prime_interpolation == "bilinear"
    assert get_config("regnety_800m").prime_interpolation == "bilinear"
    assert get_config("efficientnet_b3").image_size == 300 and get_config("efficientnet_b3").crop_pct == 0.904
    assert get_config("efficientnet_b2").image_size == 260
    assert get_config("mobilenetv3_large_125").feature_map_channels == 1200
    assert get_config("resnet50").glance_head == "gru" and get_config("regnety_600m").glance_head == "backbone"
    assert get_config("mobilenetv3_large_100").train.dsn_ratio == 5
    assert not get_config("efficientnet_b2").train.train_model_prime


@pytest.mark.parametrize("arch,kind", [("mobilenetv3_small_050", "cascade"), ("resnet18", "gru"),
                                       ("mobilenetv3_small_050", "gru"), ("resnet18", "cascade")])
def test_timm_backbones_derive_their_configuration(arch, kind):
    default = get_config(arch)
    assert default.fc_rnn == (arch == "resnet18")
    net = gfnet.build_model(arch, patch_size=32, T=4, num_classes=7, classifier=kind).eval()
    assert net.fc.is_rnn == (kind == "gru")
    out = net.anytime_predict(torch.randn(2, 3, 48, 48))
    assert out.probs.shape == (4, 2, 7)


def test_unknown_backbone_and_bad_arguments():
    with pytest.raises(ValueError, match="unknown backbone 'not_a_net'"):
        gfnet.build_model("not_a_net")
    with pytest.raises(ValueError, match="checkpoints would not load"):
        gfnet.build_model("resnet50", classifier="cascade")
    with pytest.raises(ValueError, match="T must be >= 1"):
        gfnet.build_model("resnet18", T=0)
    net = gfnet.build_model("resnet18", patch_size=32, T=2, num_classes=3)
    with pytest.raises(RuntimeError, match="eval mode"):
        net.anytime_predict(torch.randn(1, 3, 40, 40))


def test_step_state_is_batch_first_and_compacts():
    torch.manual_seed(0)
    for kind in ("gru", "cascade"):
        net = randomise_batchnorm(gfnet.build_model("resnet18", patch_size=32, T=3, num_classes=5,
                                                    classifier=kind)).eval()
        x = torch.randn(4, 3, 48, 48)
        full = net.anytime_predict(x)
        with torch.no_grad():
            out = net.step(0, x)
            keep = torch.tensor([0, 2, 3])
            state = out.state.index(keep)
            for t in (1, 2):
                out = net.step(t, x[keep], state)
                state = out.state
        torch.testing.assert_close(torch.softmax(out.logits, 1), full.probs[2, keep], rtol=1e-5, atol=1e-6)


def test_glance_prediction_source():
    torch.manual_seed(0)
    net = gfnet.build_model("mobilenetv3_small_050", patch_size=32, T=2, num_classes=5).eval()
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        out = net.step(0, x)
        pooled, _ = net.model_prime(net.glance_input(x))
        torch.testing.assert_close(out.logits, net.model_prime.head(pooled))
        # the cascade still consumed the glance
        torch.testing.assert_close(out.state.fc_hidden[:, 0], pooled)


def test_uint8_input_matches_normalised_float():
    torch.manual_seed(0)
    net = randomise_batchnorm(gfnet.build_model("resnet18", patch_size=32, T=3, num_classes=5)).eval()
    raw = torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (raw.float() / 255 - mean) / std
    a, b = net.anytime_predict(raw), net.anytime_predict(x)
    torch.testing.assert_close(a.probs, b.probs, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_and_channels_last_on_cpu():
    torch.manual_seed(0)
    net = randomise_batchnorm(gfnet.build_model("resnet18", patch_size=32, T=3, num_classes=5)).eval()
    x = torch.randn(3, 3, 48, 48)
    ref = net.anytime_predict(x)
    bf = net.anytime_predict(x, dtype="bf16")
    assert bf.probs.dtype == torch.float32
    torch.testing.assert_close(bf.probs, ref.probs, rtol=0.1, atol=0.05)
    cl = net.to_channels_last().anytime_predict(x, batch_size=2)
    torch.testing.assert_close(cl.probs, ref.probs, rtol=1e-4, atol=1e-5)


def test_count_macs_of_a_small_conv_net_counted_by_hand():
    from gfnet.flops import count_macs

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1, stride=2), nn.Flatten(),
                        nn.Linear(4 * 8 * 8, 10))
    # 16x16 outputs x 8 channels x (3 x 3 x 3) taps; 8x8 outputs x 4 x 8; 256 x 10
    assert count_macs(net, torch.zeros(1, 3, 16, 16)) == 16 * 16 * 8 * 27 + 8 * 8 * 4 * 8 + 256 * 10


def test_flops_of_resnet50_and_mobilenet_gfnets_against_hand_counts():
    from gfnet.flops import compute_flops

    P, T = 96, 3
    f = compute_flops(gfnet.build_model("resnet50", patch_size=P, T=T, num_classes=1000))
    # torchvision's ResNet-50 is 4.09 GMACs at 224 (its model card); at 96 the encoder scales by (96/224)^2.
    assert abs(f["model_flops"] / 4.09e9 - (P / 224) ** 2) < 0.02
    state = 2048 * 3 * 3  # C * ceil(P/32)^2
    policy = state * 2048 + 2048 * 1024 + 3 * 1024 * (1024 + 1024) + 1024 * 2 + 1024 * 1  # MLP, GRU, actor, critic
    fc = 3 * 1024 * (2048 + 1024) + 1024 * 1000  # GRU(2048 -> 1024) step + Linear(1024, 1000)
    assert (f["policy_flops"], f["fc_flops"]) == (policy, fc)
    m = f["model_flops"]
    assert f["flops"] == [m + fc, 2 * m + policy + 2 * fc, 3 * m + 2 * policy + 3 * fc]

    f = compute_flops(gfnet.build_model("mobilenetv3_large_100", patch_size=P, T=T, num_classes=1000))
    policy = 3 * 3 * 960 * 32 + 288 * 256 + 3 * 256 * (256 + 256) + 256 * 2 + 256  # conv 1x1 on 3x3, MLP, GRU, heads
    assert f["policy_flops"] == policy
    m, head = f["model_flops"], 1280 * 1000  # the glance's prediction: the backbone's classifier
    # cascade: step k >= 2 applies Linear(k * 1280, 1000); the glance has no cascade layer of its own
    assert f["fc_flops"] == 3 * 1280 * 1000
    assert f["flops"] == [m + head, 2 * m + head + policy + 2 * 1280 * 1000,
                          3 * m + head + 2 * policy + 2 * 1280 * 1000 + 3 * 1280 * 1000]


def test_float64_models_run_both_classifier_kinds():
    for kind in ("gru", "cascade"):
        net = gfnet.build_model("resnet18", patch_size=32, T=3, num_classes=4, classifier=kind).double().eval()
        out = net.anytime_predict(torch.randn(2, 3, 48, 48, dtype=torch.float64))
        assert out.probs.shape == (3, 2, 4)
