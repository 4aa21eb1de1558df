"""An independent statement of the reference's inference semantics, used as the tests' oracle.

It reads a checkpoint *dict* in the reference's format, loads it with ``strict=True`` into modules whose
names and structure follow the reference (``ActorCritic``, ``Full_layer``, the backbones' own forward
definitions), and runs the reference's evaluation loop: glance through F.interpolate(align_corners=True),
focus crops by a Python loop with host reads, the classifier's hidden state kept inside the module, the
policy's hidden state restarted at the first focus step. Nothing here imports gfnet's model code.
"""
from __future__ import annotations

import math
import re

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

# Reference facts (configs.py): per backbone (feature_num, fmap channels, policy_conv, policy hidden,
# fc_rnn, glance from backbone head, eval glance interpolation)
ARCH = {
    "resnet50": (2048, 2048, False, 1024, True, False, "bicubic"),
    "densenet121": (1024, 1024, False, 1024, True, False, "bilinear"),
    "regnety_600m": (608, 608, True, 256, True, True, "bilinear"),
    "mobilenetv3_large_100": (1280, 960, True, 256, False, True, "bicubic"),
    "efficientnet_b2": (1408, 1408, True, 256, False, True, "bicubic"),
}


class ActorCritic(nn.Module):
    def __init__(self, feature_dim, state_dim, hidden_state_dim, policy_conv):
        super().__init__()
        if policy_conv:
            self.state_encoder = nn.Sequential(
                nn.Conv2d(feature_dim, 32, kernel_size=1, stride=1, padding=0, bias=False), nn.ReLU(),
                nn.Flatten(), nn.Linear(int(state_dim * 32 / feature_dim), hidden_state_dim), nn.ReLU())
        else:
            self.state_encoder = nn.Sequential(nn.Linear(state_dim, 2048), nn.ReLU(),
                                               nn.Linear(2048, hidden_state_dim), nn.ReLU())
        self.gru = nn.GRU(hidden_state_dim, hidden_state_dim, batch_first=False)
        self.actor = nn.Sequential(nn.Linear(hidden_state_dim, 2), nn.Sigmoid())
        self.critic = nn.Sequential(nn.Linear(hidden_state_dim, 1))
        self.hidden_state_dim, self.policy_conv = hidden_state_dim, policy_conv
        self.memory = []

    def act(self, state, restart_batch=False):
        if restart_batch:
            self.memory = [torch.zeros(1, state.size(0), self.hidden_state_dim)]
        x = state if self.policy_conv else state.flatten(1)
        x = self.state_encoder(x)
        x, h = self.gru(x.view(1, x.size(0), x.size(1)), self.memory[-1])
        self.memory.append(h)
        return self.actor(x[0])


class Full_layer(nn.Module):
    def __init__(self, feature_num, hidden_state_dim=1024, fc_rnn=True, class_num=1000):
        super().__init__()
        self.feature_num, self.hidden_state_dim, self.fc_rnn = feature_num, hidden_state_dim, fc_rnn
        if fc_rnn:
            self.rnn = nn.GRU(feature_num, hidden_state_dim)
            self.fc = nn.Linear(hidden_state_dim, class_num)
        else:
            for k in (2, 3, 4, 5):
                setattr(self, f"fc_{k}", nn.Linear(feature_num * k, class_num))
        self.hidden = None

    def forward(self, x, restart=False):
        if self.fc_rnn:
            h0 = torch.zeros(1, x.size(0), self.hidden_state_dim) if restart else self.hidden
            out, self.hidden = self.rnn(x.view(1, x.size(0), x.size(1)), h0)
            return self.fc(out[0])
        self.hidden = x if restart else torch.cat([self.hidden, x], 1)
        k = self.hidden.size(1) // self.feature_num
        return None if k == 1 else getattr(self, f"fc_{k}")(self.hidden)


def _pycls_to_timm_regnet(key):
    # The oracle's own reading of pycls's RegNet names (anynet.py) in timm's RegNet module tree.
    rules = [(r"\.proj\.", ".downsample.conv."), (r"^(s\d\.b\d+)\.bn\.", r"\1.downsample.bn."),
             (r"\.f\.a\.", ".conv1.conv."), (r"\.f\.a_bn\.", ".conv1.bn."), (r"\.f\.b\.", ".conv2.conv."),
             (r"\.f\.b_bn\.", ".conv2.bn."), (r"\.f\.c\.", ".conv3.conv."), (r"\.f\.c_bn\.", ".conv3.bn."),
             (r"\.f\.se\.f_ex\.0\.", ".se.fc1."), (r"\.f\.se\.f_ex\.2\.", ".se.fc2."), (r"^fc\.", "head.fc.")]
    for p, r in rules:
        key = re.sub(p, r, key)
    return key


class Backbone(nn.Module):
    """The reference backbones' forward: returns (pooled, feature map) as models/*.py define them."""

    def __init__(self, arch, state):
        super().__init__()
        self.arch = arch
        state = {k[len("module."):]: v for k, v in state.items()}
        if arch == "resnet50":
            self.net = torchvision.models.resnet50(weights=None)
        elif arch == "densenet121":
            self.net = torchvision.models.densenet121(weights=None)
        elif arch == "regnety_600m":
            self.net = timm.create_model("regnety_006", pretrained=False)
            state = {_pycls_to_timm_regnet(k): v for k, v in state.items()}
        else:
            self.net = timm.create_model(arch, pretrained=False)
        self.net.load_state_dict(state, strict=True)
        self.net.eval()

    def forward(self, x):
        n = self.net
        if self.arch == "resnet50":
            x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
            x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
            return n.avgpool(x).view(x.size(0), -1), x
        if self.arch == "densenet121":
            x = F.relu(n.features(x))
            return F.adaptive_avg_pool2d(x, 1).view(x.size(0), -1), x
        if self.arch == "regnety_600m":
            x = n.stem(x)
            for s in (n.s1, n.s2, n.s3, n.s4):
                x = s(x)
            return F.adaptive_avg_pool2d(x, 1).view(x.size(0), -1), x
        if self.arch == "mobilenetv3_large_100":
            feats = n.blocks(n.bn1(n.conv_stem(x)))
            x = n.act2(n.conv_head(F.adaptive_avg_pool2d(feats, 1)))
            return x.flatten(1), feats
        x = n.bn2(n.conv_head(n.blocks(n.bn1(n.conv_stem(x)))))  # efficientnet: bn2 carries the act
        return F.adaptive_avg_pool2d(x, 1).flatten(1), x

    def head(self):
        return {"resnet50": "fc", "densenet121": "classifier", "regnety_600m": None}.get(self.arch, "classifier")


def get_patch(images, action_sequence, patch_size):
    image_size = images.size(2)
    coord = torch.floor(action_sequence * (image_size - patch_size)).int()
    patches = []
    for i in range(images.size(0)):
        r, c = coord[i, 0].item(), coord[i, 1].item()
        patches.append(images[i:i + 1, :, r:r + patch_size, c:c + patch_size])
    return torch.cat(patches, 0)


@torch.no_grad()
def reference_anytime(ckpt: dict, images: torch.Tensor):
    """The reference's generate_logits for one batch: (probs [T, N, C], actions [T-1, N, 2])."""
    arch, P = ckpt["model_name"], ckpt["patch_size"]
    T = len(ckpt["flops"])
    feature_num, fmap_c, policy_conv, hidden, fc_rnn, glance_backbone, mode = ARCH[arch]
    model_prime = Backbone(arch, ckpt["model_prime_state_dict"])
    model = Backbone(arch, ckpt["model_state_dict"])
    fc = Full_layer(feature_num, 1024 if fc_rnn else None, fc_rnn)
    fc.load_state_dict(ckpt["fc"], strict=True)
    policy = ActorCritic(fmap_c, fmap_c * math.ceil(P / 32) ** 2, hidden, policy_conv)
    policy.load_state_dict(ckpt["policy"], strict=True)
    fc.eval(), policy.eval()

    prime = F.interpolate(images, size=[P, P], mode=mode, align_corners=True)
    output, state = model_prime(prime)
    if glance_backbone:
        fc(output, restart=True)
        head = model_prime.net.head.fc if arch == "regnety_600m" else model_prime.net.classifier
        output = head(output)
    else:
        output = fc(output, restart=True)
    probs, actions = [F.softmax(output, 1)], []
    for step in range(1, T):
        action = policy.act(state, restart_batch=(step == 1))
        output, state = model(get_patch(images, action, P))
        output = fc(output, restart=False)
        probs.append(F.softmax(output, 1))
        actions.append(action)
    return torch.stack(probs), torch.stack(actions)
