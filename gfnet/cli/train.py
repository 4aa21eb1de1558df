"""``gfnet-train``: train one GFNet stage on an ImageNet-layout folder (logic: :mod:`gfnet.train`).

Single process:   gfnet-train --data ROOT --arch resnet50 --patch-size 96 --T 5 --stage 1 \\
                      --init-global r50.pth --init-local r50.pth --out runs/s1
Several GPUs:     torchrun --nproc-per-node 8 -m gfnet.cli.train ...same arguments...
Continue a stage: gfnet-train ... --stage 2 --checkpoint runs/s1/model_best.pth.tar --out runs/s2
Resume a run:     gfnet-train ...same arguments... --resume auto      (or --resume runs/s2/checkpoint.pth.tar)
Elastic:          torchrun --nproc-per-node 8 --max-restarts 3 -m gfnet.cli.train ... --resume auto
                  (a lost worker restarts the job from the last finished epoch)
Preemption:       on SIGTERM (and the --requeue-signal) every process finishes its step, the run saves
                  --out/mid_epoch.pth.tar and exits with status 128 + the signal's number (143 for
                  SIGTERM, 138 for SIGUSR1): requeue it with --resume auto, which continues the epoch there.

--checkpoint and --resume read any GFNet checkpoint: gfnet's, the reference's released files and the
reference train.py's own (which name no backbone, patch size or T: give --arch, --patch-size, --T).
--save-layout reference-train writes files that the reference's train.py continues from.
An output folder holds one run: a new run refuses a folder that holds one unless --resume continues it
or --overwrite replaces it, and a lock keeps a second process out while a run trains there.
Errors: one line on stderr, exit status 2 for bad arguments or input, 1 for failures at run time.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from gfnet.cli._errors import (
    nonnegative_float,
    nonnegative_int,
    parse_device,
    positive_float,
    positive_int,
    prepare_output_dir,
    run_command,
)

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gfnet-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset root holding train/ and val/ class folders")
    p.add_argument("--arch", help="reference backbone (resnet50, densenet121, regnety_600m, "
                   "mobilenetv3_large_100, efficientnet_b2, ...) or a timm CNN name (default: the checkpoint's)")
    p.add_argument("--patch-size", type=positive_int, help="P: glance and patch side (96, 128, 144; default: the "
                   "checkpoint's)")
    p.add_argument("--T", type=positive_int, help="maximum number of steps, glance + focus (default: the "
                   "checkpoint's)")
    p.add_argument("--stage", type=int, required=True, choices=(1, 2, 3))
    p.add_argument("--out", required=True, help="output folder: checkpoint.pth.tar, model_best.pth.tar, train.log")
    p.add_argument("--init-global", help="stage 1: backbone weights of the global encoder (a state dict, or "
                   "a GFNet checkpoint's model_prime_state_dict)")
    p.add_argument("--init-local", help="stage 1: backbone weights of the local encoder (a state dict, or "
                   "a GFNet checkpoint's model_state_dict)")
    p.add_argument("--checkpoint", help="stages 2/3: the previous stage's GFNet checkpoint (gfnet's or the "
                   "reference's, release or train.py layout)")
    p.add_argument("--resume", metavar="auto|PATH",
                   help="continue an interrupted run: 'auto' resumes from --out's last checkpoint if there is "
                        "one (else starts fresh); a PATH resumes from that checkpoint.pth.tar (written by "
                        "gfnet-train or the reference's train.py)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run that --out already holds (its checkpoint.pth.tar and "
                        "model_best.pth.tar are moved aside, deleted once the new run has written its first "
                        "checkpoint and put back if it stops before); without it such a folder is refused")
    p.add_argument("--save-layout", choices=("release", "reference-train"), default="release",
                   help="checkpoint layout: release (module.-prefixed; the reference's inference.py and "
                        "gfnet-eval) or reference-train (what the reference's train.py continues from)")
    o = p.add_argument_group("overrides (default: the reference's value for the backbone family)")
    o.add_argument("--epochs", type=positive_int)
    o.add_argument("--batch-size", type=positive_int, help="global batch over all processes (reference 256)")
    o.add_argument("--lr", type=positive_float, help="backbone learning rate")
    o.add_argument("--fc-lr", type=positive_float, help="classifier learning rate (0.1 stage 1, 0.01 stage 3)")
    o.add_argument("--policy-lr", type=positive_float, default=3e-4,
                   help="stage 2: Adam learning rate of the policy")
    o.add_argument("--weight-decay", type=nonnegative_float)
    o.add_argument("--dsn-ratio", type=nonnegative_float, help="deep-supervision weight")
    o.add_argument("--train-global", choices=("yes", "no"), help="train the global encoder in stages 1/3")
    o.add_argument("--stage3-actions", choices=("sample", "mean"), default="sample",
                   help="stage 3 patches: sampled around the policy mean as the reference does, or the mean")
    o.add_argument("--continue-policy", action="store_true",
                   help="stage 2: continue PPO from the checkpoint's policy (default: a fresh policy, as the "
                        "reference's train.py)")
    o.add_argument("--transforms", choices=("reference", "backbone"), default="reference",
                   help="training images: reference = the reference train.py's 224 px bilinear crops for every "
                        "backbone; backbone = the backbone's inference size and filter (EfficientNet-B2 260, "
                        "B3 300 px, bicubic)")
    o.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("runtime")
    r.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                   help="mixed precision (auto: bf16 on GPUs that have it, fp16 on older ones, none on the CPU)")
    r.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels-last encoders (default on: faster convolutions with oneDNN and cuDNN)")
    r.add_argument("--compile", action="store_true",
                   help="compile the encoders with torch.compile (the first steps take longer while they compile)")
    r.add_argument("--device", help="cpu, cuda, cuda:K (default: this process's GPU if any, else cpu)")
    r.add_argument("--backend", choices=("dali", "torchvision"), default="dali", help="input pipeline")
    r.add_argument("--workers", type=nonnegative_int, help="DALI threads / DataLoader workers per process "
                   "(0: the torchvision backend reads in the main process)")
    r.add_argument("--float-input", action="store_true",
                   help="have the loader normalise to float (default: uint8, normalised by the fused ops)")
    r.add_argument("--no-val", action="store_true", help="skip the per-epoch validation")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--requeue-signal", choices=("USR1", "USR2"), action="append", default=[],
                   help="also stop and save on this signal, as on SIGTERM (SLURM's --signal=USR1@SECONDS warns "
                        "of the time limit with it); the exit status is then 128 + its number (USR1: 138)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("gfnet-train", lambda: _train(args),
                       on_interrupt=f"{args.out} keeps the last finished epoch: continue with --resume auto",
                       quiet_stop=int(os.environ.get("RANK", "0")) != 0)


def _train(args) -> int:
    from gfnet.train import TrainOptions, train_imagefolder
    from gfnet.train.session import check_out_outside_data

    parse_device(args.device)
    if args.overwrite and args.resume == "auto":
        raise ValueError("--resume auto continues the run in --out; --overwrite replaces it: give one of them")
    check_out_outside_data(args.data, args.out)  # before the folder is made: inside train/ it would be a class
    prepare_output_dir(args.out)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.INFO)  # per-step lines go to the log file only
    logging.getLogger("gfnet.train").setLevel(logging.DEBUG)
    if int(os.environ.get("RANK", "0")) == 0:  # one note, not one per process
        from gfnet.device import resolve_device
        from gfnet.precision import bf16_offer

        offer = bf16_offer(resolve_device(args.device), args.amp, option="--amp bf16")
        if offer:
            print(offer, file=sys.stderr)
    options = TrainOptions(
        stage=args.stage, epochs=args.epochs, batch_size=args.batch_size, backbone_lr=args.lr, fc_lr=args.fc_lr,
        policy_lr=args.policy_lr, weight_decay=args.weight_decay, dsn_ratio=args.dsn_ratio,
        train_global=None if args.train_global is None else args.train_global == "yes",
        stage3_actions=args.stage3_actions, amp=args.amp, channels_last=args.channels_last,
        compile=args.compile, seed=args.seed,
        progress=not args.no_progress, continue_policy=args.continue_policy, transforms=args.transforms,
        save_layout=args.save_layout)
    history = train_imagefolder(
        args.data, args.arch, args.patch_size, args.T, args.stage, args.out, options,
        init_global=args.init_global, init_local=args.init_local, checkpoint=args.checkpoint,
        resume=args.resume, backend=args.backend, workers=args.workers, device=args.device,
        validate=not args.no_val, uint8=not args.float_input, overwrite=args.overwrite,
        stop_signals=("SIGTERM", *args.requeue_signal))
    if history and int(os.environ.get("RANK", "0")) == 0:  # one report, not one per process
        last = history[-1]
        acc = last.get("val_acc", last["train_acc"])
        print(f"stage {args.stage} done: epoch {last['epoch']}, anytime accuracy "
              + " ".join(f"{a:.2f}" for a in acc) + f" (%), checkpoints in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
