"""The precision notes that gfnet-train and gfnet-eval print once, on rank 0, before the work starts: the offer
of bf16 where the CPU has native bf16 units and no precision was named (:func:`gfnet.precision.bf16_offer`), and
the warning that bf16 is emulated, with the slowdown measured then and there, where it has none
(:func:`gfnet.precision.emulated_bf16_note`)."""
from __future__ import annotations

import os
import sys
from typing import Optional

#: the network measured when the command does not name one (a checkpoint or resumed run names it later): the
#: reference's headline backbone at its usual patch size
DEFAULT_ARCH, DEFAULT_PATCH = "resnet50", 96


def _glance_step(arch: str, patch_size: int, training: bool):
    """One glance step of a freshly built GFNet of ``arch`` (what a step costs does not depend on its weights):
    forward and backward at batch 2 when ``training`` (batch norm needs two samples), else a forward at batch 1
    without autograd."""
    import torch

    from gfnet import build_model

    net = build_model(arch, patch_size=patch_size, T=2).train(training)
    images = torch.rand(2 if training else 1, 3, patch_size, patch_size, generator=torch.Generator().manual_seed(0))

    def run():
        if training:
            net.step(0, images).logits.float().sum().backward()
        else:
            with torch.no_grad():
                net.step(0, images)
    return run


def print_precision_notes(device, amp: Optional[str], option: str, arch: Optional[str], patch_size: Optional[int],
                          training: bool, stream=None) -> None:
    """Print the bf16 offer or the emulated-bf16 warning (at most one line each), on rank 0 only."""
    if int(os.environ.get("RANK", "0")) != 0:  # one note, not one per process
        return
    from gfnet.precision import bf16_offer, emulated_bf16_note

    stream = stream or sys.stderr
    offer = bf16_offer(device, amp, option=option)
    if offer:
        print(offer, file=stream)
    arch = arch or DEFAULT_ARCH
    patch_size = patch_size or DEFAULT_PATCH
    what = (f"a {'training step (forward and backward, batch 2)' if training else 'forward (batch 1)'} of the "
            f"glance of a {arch} GFNet (P={patch_size})")
    try:
        note = emulated_bf16_note(device, amp, option, lambda: _glance_step(arch, patch_size, training), what)
    except Exception as err:  # the note must never stop the run: say what could not be measured
        note = (f"note: this CPU has no native bf16 units, so {option} emulates bf16 and runs slower than fp32 "
                f"here (the slowdown could not be measured on {arch}: {type(err).__name__}: {err})")
    if note:
        print(note, file=stream, flush=True)
