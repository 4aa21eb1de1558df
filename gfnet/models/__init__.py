"""GFNet models: encoders, policy, classifier and the network that ties them together."""
from gfnet.models.classifier import Classifier
from gfnet.models.encoder import Encoder, build_backbone
from gfnet.models.gfnet import AnytimePrediction, GFNet, GFNetState, StepOutput, build_model
from gfnet.models.meta import ModelMeta
from gfnet.models.policy import ACTION_STD, Policy

__all__ = ["AnytimePrediction", "Classifier", "Encoder", "GFNet", "GFNetState", "ModelMeta", "Policy", "StepOutput",
           "build_backbone", "build_model", "ACTION_STD"]
