"""Training GFNets: the three stages, PPO, mixed precision, DDP, resumable checkpoints, preemption.

Python entry points: :class:`Trainer` with :class:`TrainOptions` (any iterable of batches),
:func:`train_imagefolder` (what ``gfnet-train`` runs: an ImageNet-layout folder through gfnet.data).
"""
from gfnet.train.distributed import DistributedContext, init_distributed
from gfnet.train.objective import ACTION_MODES, PPOObjective, SequenceObjective, run_glance
from gfnet.train.preemption import Preempted
from gfnet.train.rollout import Rollout, collect_rollout, discount_returns, normalise_returns
from gfnet.train.session import build_training_model, train_imagefolder
from gfnet.train.tensor_loader import TensorLoader
from gfnet.train.trainer import BEST_NAME, CHECKPOINT_NAME, Trainer, TrainOptions, cosine_lr
from gfnet.train.weights import load_backbone_weights, load_network_weights

__all__ = ["ACTION_MODES", "BEST_NAME", "CHECKPOINT_NAME", "DistributedContext", "PPOObjective", "Preempted", "Rollout",
           "SequenceObjective", "TensorLoader", "TrainOptions", "Trainer", "build_training_model",
           "collect_rollout", "cosine_lr", "discount_returns", "init_distributed", "load_backbone_weights",
           "load_network_weights", "normalise_returns", "run_glance", "train_imagefolder"]
