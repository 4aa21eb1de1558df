"""Multiply-Adds accounting, as the reference checkpoints store it, counted by PyTorch's own counter.

``torch.utils.flop_counter.FlopCounterMode`` counts FLOPs of matrix multiplications and convolutions
(2 per multiply-add); we report Multiply-Adds (MACs), the unit of the GFNet paper's budget axes.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_macs", "compute_flops", "known_flops"]


def count_macs(fn: Callable, *args, **kwargs) -> int:
    """Multiply-Adds of one call ``fn(*args, **kwargs)`` (matmuls and convolutions)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops()) // 2


def compute_flops(net) -> dict:
    """The reference's four Multiply-Adds fields for a :class:`gfnet.GFNet`, for one image.

    Returns a dict with
    - ``model_flops``: one pass of an encoder on a P x P input (both encoders share the architecture);
    - ``policy_flops``: one policy step;
    - ``fc_flops``: one classifier step (for the cascade, the last and largest one, fc_T);
    - ``flops``: list of T cumulative costs, ``flops[k]`` = Multiply-Adds of running steps 1..k+1:
      the glance (global encoder + its prediction), then for each focus step the policy, the local
      encoder and that step's classifier.
    """
    was_training = net.training
    net.eval()
    # counted on the eager modules: a compiled model (GFNet.compile) would otherwise compile for a one-image
    # batch here, and its real batches would then recompile with dynamic shapes
    try:
        with torch.compiler.set_stance("force_eager"):
            device = next(net.parameters()).device
            dtype = next(net.parameters()).dtype
            P = net.patch_size
            x = torch.zeros(1, 3, P, P, device=device, dtype=dtype)
            with torch.no_grad():
                pooled, fmap = net.model(x)
            model_flops = count_macs(net.model, x)
            hidden = net.policy.init_hidden(1, device, dtype)
            policy_flops = count_macs(net.policy, fmap, hidden)
            fc_state = net.fc.init_state(1, device, dtype)

            def classifier_cost(t: int) -> int:
                return count_macs(net.fc, pooled, fc_state, t)

            glance_head = 0
            if net.config.glance_head == "backbone" or not net.fc.is_rnn:
                glance_head = count_macs(net.model_prime.head, pooled)
            flops = [model_flops + classifier_cost(0) + glance_head]
            for t in range(1, net.T):
                flops.append(flops[-1] + policy_flops + model_flops + classifier_cost(t))
            fc_flops = classifier_cost(net.T - 1) if net.T > 1 else classifier_cost(0)
            return {"model_flops": model_flops, "policy_flops": policy_flops, "fc_flops": fc_flops,
                    "flops": flops}
    finally:
        net.train(was_training)


#: The Multiply-Add fields of a checkpoint (and of ``net.meta``) that :func:`compute_flops` counts.
FLOPS_FIELDS = ("flops", "model_flops", "policy_flops", "fc_flops")


def known_flops(net) -> dict:
    """The one rule for a network's Multiply-Adds: what ``net.meta`` holds (a checkpoint stored them), else
    counted now by :func:`compute_flops` and kept in ``net.meta`` so that they are counted once. Returns
    {flops (cumulative per step count), model_flops, policy_flops, fc_flops}."""
    meta = net.meta
    if meta.flops is None:
        meta.set_flops(compute_flops(net))
    return {k: getattr(meta, k) for k in FLOPS_FIELDS}
