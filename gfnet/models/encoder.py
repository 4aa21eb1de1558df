"""Backbone encoders: a CNN that returns (pooled features, detached feature map).

The global encoder (``model_prime``) reads the glance, the local encoder (``model``) the focus patches.
Backbones are built offline (no pretrained download) through torchvision (ResNet, DenseNet: the
reference checkpoints use torchvision's key names) or timm (RegNet-Y, MobileNet-V3, EfficientNet, any
other timm CNN). The wrapped network sits at ``Encoder.net`` so that its ``state_dict`` keys are the
backbone's own, as in the reference checkpoints.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gfnet.config import BackboneConfig

__all__ = ["Encoder", "build_backbone"]


def build_backbone(config: BackboneConfig, num_classes: int = 1000) -> nn.Module:
    """The randomly initialised backbone network of ``config`` (never downloads weights)."""
    if config.builder == "torchvision":
        import torchvision.models as tvm

        return getattr(tvm, config.source_name)(weights=None, num_classes=num_classes)
    import timm

    kwargs = dict(pretrained=False, num_classes=num_classes, drop_rate=config.drop_rate,
                  drop_path_rate=config.drop_path_rate)
    if config.family == "mobilenetv3" and config.source_name not in timm.list_models():
        # timm has no registered mobilenetv3_large_125; its generator builds it with the same names.
        from timm.models.mobilenetv3 import _gen_mobilenet_v3

        return _gen_mobilenet_v3(config.source_name, config.channel_multiplier, **kwargs)
    return timm.create_model(config.source_name, **kwargs)


class Encoder(nn.Module):
    """A backbone CNN returning the reference's ``(pooled, feature_map.detach())`` pair.

    Args:
        config: the backbone's configuration.
        num_classes: size of the backbone's own head (used for the glance prediction of RegNet,
            MobileNet-V3 and EfficientNet, and for deep supervision in training).

    Forward:
        x: Tensor[N, 3, P, P] float (any device, any float dtype under autocast).
        returns pooled: Tensor[N, feature_num] and feature_map: Tensor[N, C, h, w] (detached),
        h = w = ceil(P / 32) for the reference backbones.
    """

    def __init__(self, config: BackboneConfig, num_classes: int = 1000):
        super().__init__()
        self.config = config
        self.net = build_backbone(config, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net, family = self.net, self.config.family
        if family == "resnet":
            x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            fmap = net.layer4(net.layer3(net.layer2(net.layer1(x))))
            pooled = torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)
        elif family == "densenet":
            fmap = F.relu(net.features(x))
            pooled = torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)
        else:
            # timm: MobileNet-V3's forward_features stops before the head conv (the reference's
            # feature map) and forward_head(pre_logits) pools, applies conv_head and dropout.
            fmap = net.forward_features(x)
            pooled = net.forward_head(fmap, pre_logits=True)
        return pooled, fmap.detach()

    @property
    def head(self) -> nn.Module:
        """The backbone's own linear classifier (``fc`` / ``classifier`` / ``head.fc``)."""
        mod = self.net
        for part in self.config.head_attr.split("."):
            mod = getattr(mod, part)
        return mod
