"""A training run that tests/test_faults.py starts as a subprocess and kills for real.

    python tests/fault_runner.py CONFIG_JSON

CONFIG (a JSON object):
    mode: "tensor" (Trainer on an in-memory task, train accuracy as the score) or "folder"
        (gfnet.train.train_imagefolder on a sample tree: data, backend, workers);
    out: the run folder; epochs; resume (None, "auto" or a path); seed; lr;
    dump: a folder where each finished epoch's parameters go (tensor mode; for the uninterrupted run);
    kill: {"file": "checkpoint.pth.tar" | "model_best.pth.tar", "epoch": E, "phase": "during" | "after"}:
        SIGKILL this process while it saves that file for epoch E: "during" once the temporary file is
        fully written, just before its rename; "after" right after the rename.
    stop_signals: the signals the trainer stops and saves on (default none; "folder" mode: SIGTERM);
    pause: {"step": K, "marker": PATH}: see :func:`install_pause` (the test sends a signal meanwhile);
    mode "cli" runs ``gfnet-train`` with the arguments ``argv`` instead (exit status: the command's).

Only the moment of death is arranged here (by wrapping the save); the kill itself is a real SIGKILL. A run
that a stop signal ended prints its history and exits with the status of gfnet.train.preemption.Preempted.
"""
import json
import os
import signal
import sys
import time

import torch

S, P, T, CLASSES, N, BATCH = 40, 16, 3, 4, 32, 8


def learnable_task(seed: int = 0):
    """Tensor[N, 3, S, S] uint8 images whose class is a bright quadrant, and their labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(N) % CLASSES
    images = torch.randint(0, 80, (N, 3, S, S), generator=g, dtype=torch.uint8)
    for i, c in enumerate(labels.tolist()):
        r, q = divmod(c, 2)
        images[i, :, r * S // 2:(r + 1) * S // 2, q * S // 2:(q + 1) * S // 2] += 150
    return images, labels


def install_kill(kill: dict) -> None:
    import gfnet.checkpoint as checkpoint
    import gfnet.train.trainer as trainer

    real_save, real_replace = trainer.atomic_save, os.replace
    armed = []

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def replace(src, dst, *args, **kwargs):
        if armed and os.path.basename(dst) == kill["file"]:
            die()  # the temporary file is complete; the rename never happens
        return real_replace(src, dst, *args, **kwargs)

    def save(obj, path):
        hit = os.path.basename(path) == kill["file"] and obj["epoch"] == kill["epoch"]
        if hit and kill["phase"] == "during":
            armed.append(True)
        real_save(obj, path)
        if hit and kill["phase"] == "after":
            die()

    trainer.atomic_save = save
    checkpoint.os.replace = replace


def install_pause(pause: dict) -> None:
    """After the training step that brings the run's step counter to ``pause["step"]`` (on rank
    ``pause.get("rank", 0)``), write this process's pid to ``pause["marker"]`` and wait (up to 2 minutes)
    for the file ``marker + ".sent"``: a test sends its signal from outside meanwhile, at a known step."""
    from gfnet.train.trainer import Trainer

    real_step = Trainer.train_step

    def train_step(self, images, labels):
        out = real_step(self, images, labels)
        if self.global_step == pause["step"] and self.ctx.rank == pause.get("rank", 0):
            marker = pause["marker"]
            with open(marker + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(marker + ".tmp", marker)
            deadline = time.monotonic() + 120
            while not os.path.exists(marker + ".sent") and time.monotonic() < deadline:
                time.sleep(0.05)
        return out

    Trainer.train_step = train_step


def main(cfg: dict) -> None:
    torch.set_num_threads(1)
    if cfg.get("kill"):
        install_kill(cfg["kill"])
    if cfg.get("pause"):
        install_pause(cfg["pause"])
    if cfg["mode"] == "cli":
        from gfnet.cli.train import main as gfnet_train

        sys.exit(gfnet_train(cfg["argv"]))
    from gfnet.train import TrainOptions
    from gfnet.train.preemption import Preempted

    options = TrainOptions(stage=1, epochs=cfg["epochs"], backbone_lr=cfg.get("lr", 0.05), fc_lr=cfg.get("lr", 0.05),
                           train_global=True, progress=False, seed=cfg.get("seed", 0), batch_size=BATCH)
    try:
        history = train(cfg, options)
    except Preempted as e:
        print(json.dumps({"stopped": str(e)}))
        sys.exit(e.exit_status)
    print(json.dumps([{"epoch": r["epoch"], "acc": r["acc"]} for r in history]))


def train(cfg: dict, options) -> list:
    import gfnet
    from gfnet.train import TensorLoader, Trainer, train_imagefolder

    if cfg["mode"] == "folder":
        return train_imagefolder(cfg["data"], "test_efficientnet", P, 2, 1, cfg["out"], options,
                                 resume=cfg.get("resume"), backend=cfg.get("backend", "torchvision"),
                                 workers=cfg.get("workers", 2), device="cpu", validate=False,
                                 stop_signals=cfg.get("stop_signals", ["SIGTERM"]))
    torch.manual_seed(cfg.get("init_seed", 0))
    net = gfnet.build_model("test_efficientnet", patch_size=P, T=T, num_classes=CLASSES)
    images, labels = learnable_task()
    loader = TensorLoader(images, labels, BATCH, train=True, seed=cfg.get("seed", 0))

    def dump(trainer, record):
        if cfg.get("dump"):
            os.makedirs(cfg["dump"], exist_ok=True)
            torch.save({k: v.clone() for k, v in trainer.net.state_dict().items()},
                       os.path.join(cfg["dump"], f"epoch{record['epoch']}.pt"))

    trainer = Trainer(net, options, out_dir=cfg["out"], stop_signals=cfg.get("stop_signals", []))
    return trainer.fit(loader, resume=cfg.get("resume"), callbacks=[dump])


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
