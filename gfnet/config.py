"""Per-backbone configuration: one dataclass per backbone, as the reference configs define them.

The numbers (feature sizes, policy/classifier kinds, image size, crop_pct, interpolation, learning
rates, epochs, deep-supervision ratio) are the reference's (blackfeather-wang/GFNet-Pytorch
``configs.py``); see ../shared/DESIGN.md. Any other timm model name gets a configuration derived
from the backbone itself (:func:`derive_config`), so that small models serve tests and demos.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["BackboneConfig", "DataTransforms", "TrainConfig", "REFERENCE_ARCHS", "TRANSFORMS", "IMAGENET_MEAN",
           "IMAGENET_STD", "get_config", "derive_config"]

# ImageNet's per-channel mean and std in [0, 1] units, the normalisation of every reference backbone (kept in
# each BackboneConfig, as timm keeps it in its pretrained configs; this is the one definition of the numbers).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Training-data transforms (:meth:`BackboneConfig.train_transforms`): "reference" is the reference
#: train.py's for every backbone, "backbone" the backbone's inference resolution and filter.
TRANSFORMS = ("reference", "backbone")


@dataclass(frozen=True)
class DataTransforms:
    """Geometry of the training and validation images: training takes a RandomResizedCrop of side
    ``image_size``, validation resizes the shorter side to ``int(image_size / crop_pct)`` and takes the
    centre ``image_size`` crop; both resize with ``interpolation``."""

    name: str
    image_size: int
    crop_pct: float
    interpolation: str


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation defaults of one backbone family (the reference's ``train_configurations``)."""

    backbone_lr: float = 0.01
    fc_stage1_lr: float = 0.1
    fc_stage3_lr: float = 0.01
    weight_decay: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = True
    batch_size: int = 256
    dsn_ratio: float = 1.0
    epochs: int = 60
    policy_epochs: int = 15
    train_model_prime: bool = True


RESNET_TRAIN = TrainConfig(backbone_lr=0.01, dsn_ratio=1, epochs=60, train_model_prime=True)
DENSENET_TRAIN = TrainConfig(backbone_lr=0.01, dsn_ratio=1, epochs=60, train_model_prime=True)
REGNET_TRAIN = TrainConfig(backbone_lr=0.02, weight_decay=5e-5, dsn_ratio=1, epochs=60, train_model_prime=True)
MOBILENET_TRAIN = TrainConfig(backbone_lr=0.005, dsn_ratio=5, epochs=90, train_model_prime=False)
EFFICIENTNET_TRAIN = TrainConfig(backbone_lr=0.005, dsn_ratio=5, epochs=30, train_model_prime=False)


@dataclass(frozen=True)
class BackboneConfig:
    """Everything that distinguishes one GFNet backbone from another.

    Attributes:
        name: the reference's spelling (``resnet50``, ``regnety_1.6g``, ...) or a timm model name.
        family: ``resnet``, ``densenet``, ``regnet``, ``mobilenetv3``, ``efficientnet`` or ``timm``;
            decides how the backbone is built and where its feature map is taken.
        builder: ``torchvision`` or ``timm``; ``source_name`` is the name in that library and
            ``channel_multiplier`` the width multiplier for MobileNet-V3 variants timm lacks.
        feature_num: size of the pooled feature vector fed to the classifier.
        feature_map_channels: channels C of the feature map read by the policy.
        policy_conv: policy state encoder is Conv1x1(C->32) + Linear (True) or a 2-layer MLP (False).
        policy_hidden_dim: GRU width of the policy (1024 for ResNet/DenseNet, else 256).
        fc_rnn: the classifier is a GRU (True) or the cascade of Linear layers fc_2..fc_5 (False).
        fc_hidden_dim: GRU width of the classifier.
        glance_head: ``gru`` (the glance prediction comes from the GRU classifier) or ``backbone``
            (from the global encoder's own head, the GRU/cascade still consumes the glance).
        head_attr: attribute path of the backbone's own linear head (deep supervision).
        image_size: full-resolution input size S; crop_pct: the validation centre-crop ratio.
        mean, std: the input normalisation in [0, 1] units (ImageNet's for every reference backbone).
        dataset_interpolation: resize filter of the data pipeline.
        prime_interpolation: glance resize filter at evaluation (the reference's ``prime_interpolation``).
        drop_rate / drop_path_rate: dropout on pooled features and stochastic depth in training.
    """

    name: str
    family: str
    builder: str
    source_name: str
    feature_num: int
    feature_map_channels: int
    policy_conv: bool
    policy_hidden_dim: int
    fc_rnn: bool
    fc_hidden_dim: Optional[int]
    glance_head: str
    head_attr: str
    image_size: int = 224
    crop_pct: float = 0.875
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    dataset_interpolation: str = "bilinear"
    prime_interpolation: str = "bicubic"
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    channel_multiplier: float = 1.0
    train: TrainConfig = field(default_factory=TrainConfig)

    def state_dim(self, patch_size: int) -> int:
        """Flattened size of the policy state: C * ceil(P/32)^2 (the feature map of a P x P input)."""
        return self.feature_map_channels * math.ceil(patch_size / 32) ** 2

    def train_transforms(self, kind: str = "reference") -> DataTransforms:
        """The data geometry of training (and its per-epoch validation).

        ``"reference"``: the reference's train.py, for every backbone: RandomResizedCrop(224) and
        Resize(256) + CenterCrop(224), bilinear (torchvision's default) -- EfficientNet-B2/B3 included.
        ``"backbone"``: this backbone's inference setting (``image_size``, ``crop_pct``,
        ``dataset_interpolation``; EfficientNet-B2 260 and B3 300 px, bicubic), as the reference's
        inference.py evaluates.
        """
        if kind == "reference":
            return DataTransforms("reference", 224, 224 / 256, "bilinear")
        if kind == "backbone":
            return DataTransforms("backbone", self.image_size, self.crop_pct, self.dataset_interpolation)
        raise ValueError(f"transforms must be one of {TRANSFORMS}, got {kind!r}")

    def replace(self, **changes) -> BackboneConfig:
        return dataclasses.replace(self, **changes)


def _resnet(name, feature_num):
    return BackboneConfig(
        name=name, family="resnet", builder="torchvision", source_name=name,
        feature_num=feature_num, feature_map_channels=feature_num, policy_conv=False,
        policy_hidden_dim=1024, fc_rnn=True, fc_hidden_dim=1024, glance_head="gru", head_attr="fc",
        prime_interpolation="bicubic", train=RESNET_TRAIN)


def _densenet(name, feature_num):
    return BackboneConfig(
        name=name, family="densenet", builder="torchvision", source_name=name,
        feature_num=feature_num, feature_map_channels=feature_num, policy_conv=False,
        policy_hidden_dim=1024, fc_rnn=True, fc_hidden_dim=1024, glance_head="gru",
        head_attr="classifier", prime_interpolation="bilinear", train=DENSENET_TRAIN)


def _regnet(name, timm_name, feature_num):
    return BackboneConfig(
        name=name, family="regnet", builder="timm", source_name=timm_name,
        feature_num=feature_num, feature_map_channels=feature_num, policy_conv=True,
        policy_hidden_dim=256, fc_rnn=True, fc_hidden_dim=1024, glance_head="backbone",
        head_attr="head.fc", prime_interpolation="bilinear", train=REGNET_TRAIN)


def _mobilenet(name, multiplier, fmap_channels):
    return BackboneConfig(
        name=name, family="mobilenetv3", builder="timm", source_name=name,
        feature_num=1280, feature_map_channels=fmap_channels, policy_conv=True, policy_hidden_dim=256,
        fc_rnn=False, fc_hidden_dim=None, glance_head="backbone", head_attr="classifier",
        prime_interpolation="bicubic", drop_rate=0.2, drop_path_rate=0.2,
        channel_multiplier=multiplier, train=MOBILENET_TRAIN)


def _efficientnet(name, feature_num, image_size, crop_pct):
    return BackboneConfig(
        name=name, family="efficientnet", builder="timm", source_name=name,
        feature_num=feature_num, feature_map_channels=feature_num, policy_conv=True,
        policy_hidden_dim=256, fc_rnn=False, fc_hidden_dim=None, glance_head="backbone",
        head_attr="classifier", image_size=image_size, crop_pct=crop_pct,
        dataset_interpolation="bicubic", prime_interpolation="bicubic", drop_rate=0.3,
        drop_path_rate=0.2, train=EFFICIENTNET_TRAIN)


REFERENCE_ARCHS: dict[str, BackboneConfig] = {
    c.name: c
    for c in (
        _resnet("resnet50", 2048),
        _densenet("densenet121", 1024),
        _densenet("densenet169", 1664),
        _densenet("densenet201", 1920),
        _regnet("regnety_600m", "regnety_006", 608),
        _regnet("regnety_800m", "regnety_008", 768),
        _regnet("regnety_1.6g", "regnety_016", 888),
        _mobilenet("mobilenetv3_large_100", 1.0, 960),
        _mobilenet("mobilenetv3_large_125", 1.25, 1200),
        _efficientnet("efficientnet_b2", 1408, 260, 0.875),
        _efficientnet("efficientnet_b3", 1536, 300, 0.904),
    )
}


def derive_config(name: str, classifier: Optional[str] = None) -> BackboneConfig:
    """Configuration for any timm model name, read off the backbone itself.

    MobileNet-V3-like models (a ``conv_head`` after pooling) take their feature map before the head
    conv, like the reference's MobileNet-V3; everything else takes ``forward_features``. The
    classifier kind follows the family (cascade for MobileNet/EfficientNet classes, GRU otherwise)
    unless ``classifier`` ("gru" or "cascade") says otherwise.
    """
    import timm
    import torch

    try:
        net = timm.create_model(name, pretrained=False, num_classes=10)
    except RuntimeError as e:  # timm: "Unknown model"
        raise ValueError(
            f"unknown backbone {name!r}: not one of the reference's {sorted(REFERENCE_ARCHS)} "
            f"nor a timm model name (see timm.list_models())") from e
    net.eval()
    try:
        with torch.no_grad():
            fmap = net.forward_features(torch.zeros(1, 3, 64, 64))
            pooled = net.forward_head(fmap, pre_logits=True)
    except (AssertionError, RuntimeError, ValueError) as e:  # e.g. a ViT that only takes its own image size
        raise ValueError(f"backbone {name!r} is no CNN that GFNet can use: it fails on a 64x64 image "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); GFNet needs a "
                         "convolutional backbone that takes any image size (a ResNet, DenseNet, RegNet, "
                         "MobileNet, EfficientNet, ...)") from None
    if fmap.dim() != 4:
        raise ValueError(f"backbone {name!r} gives a {fmap.dim()}-d feature map; GFNet's policy needs "
                         "a convolutional [N, C, h, w] feature map (use a CNN backbone)")
    cls_name = type(net).__name__
    cascade_family = cls_name in ("MobileNetV3", "EfficientNet")
    kind = classifier or ("cascade" if cascade_family else "gru")
    if kind not in ("gru", "cascade"):
        raise ValueError(f"classifier must be 'gru' or 'cascade', got {classifier!r}")
    head = "classifier" if hasattr(net, "classifier") else ("fc" if hasattr(net, "fc") else "head.fc")
    return BackboneConfig(
        name=name, family="timm", builder="timm", source_name=name,
        feature_num=int(pooled.shape[1]), feature_map_channels=int(fmap.shape[1]), policy_conv=True,
        policy_hidden_dim=256, fc_rnn=kind == "gru", fc_hidden_dim=1024 if kind == "gru" else None,
        glance_head="gru" if kind == "gru" else "backbone", head_attr=head,
        train=MOBILENET_TRAIN if cascade_family else RESNET_TRAIN)


def get_config(name: str, classifier: Optional[str] = None) -> BackboneConfig:
    """The configuration of ``name``: the reference's table, else derived from the timm backbone."""
    if name in REFERENCE_ARCHS:
        cfg = REFERENCE_ARCHS[name]
        if classifier is not None and (classifier == "gru") != cfg.fc_rnn:
            raise ValueError(f"{name} uses the {'gru' if cfg.fc_rnn else 'cascade'} classifier in the "
                             "reference; its checkpoints would not load with another one")
        return cfg
    return derive_config(name, classifier)
