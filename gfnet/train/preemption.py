"""Stopping a training run on a scheduler's signal, and resuming it in the middle of the epoch.

Schedulers preempt a job with a signal and a grace period before SIGKILL: SLURM sends SIGTERM to every
process of the job at preemption and at the time limit (``GraceTime``/``KillWait`` later SIGKILL) and, with
``--signal=USR1@SECONDS``, SIGUSR1 ahead of the limit; Kubernetes sends SIGTERM
(``terminationGracePeriodSeconds``, 30 s by default); torchrun's agent, signalled itself, passes the
signal to each worker's process group and SIGKILLs it 30 s later. Redoing the interrupted epoch would
cost up to an epoch of ImageNet; instead, while :meth:`gfnet.train.Trainer.fit` runs with
``stop_signals`` (``gfnet-train``: SIGTERM always, ``--requeue-signal USR1`` adds SIGUSR1):

1. A stop signal only sets a flag (:class:`StopRequest`); the current step finishes.
2. After each step every process votes: an all-reduce (MAX) on a gloo group of its own, overlapped with
   the next step, so a signal that reaches one rank stops every rank after the same step (the step after
   the one that saw it) and costs no synchronisation of the accelerator.
3. The run writes ``mid_epoch.pth.tar`` atomically: the checkpoint of the moment (weights, optimisers,
   gradient scaler, counters, history, every process's random state) plus the position in the epoch's
   data order (the batches trained of the epoch's plan) and each process's partial sums of the epoch's
   statistics (:class:`MidEpoch`), then :class:`Preempted` is raised; ``gfnet-train`` exits with status
   128 + the signal's number (:func:`exit_status`: 143 after SIGTERM, 138 after SIGUSR1), what a shell
   reports for a process that a signal ended, for the job script or the scheduler to requeue it.
4. ``--resume auto`` (or the file's path) restores all of it and starts the epoch's plan at the next
   batch (the loaders' ``set_epoch(epoch, start=k)``; another loader is read and the batches before
   ``k`` discarded): data order and augmentations depend only on (seed, epoch, batch), so the finished
   run has the weights of an uninterrupted one, bit for bit where the kernels are deterministic.

A signal that arrives during validation or a save, or whose vote ends with the epoch's last step, stops
the run after that epoch's save instead (``checkpoint.pth.tar`` is then the state to resume). The
mid-epoch file is never a finished epoch: the best model is written at epoch ends only, ``--resume auto``
prefers it only to the files of the epochs it follows (:class:`gfnet.train.run_folder.RunFolder`), and
the next finished epoch's save deletes it. A mid-epoch state resumes with the process count and the
per-process batch it was written with (the position is one in that plan); otherwise the resume is refused.
"""
from __future__ import annotations

import dataclasses
import inspect
import itertools
import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from gfnet.checkpoint import atomic_save
from gfnet.train.distributed import DistributedContext
from gfnet.train.run_folder import MID_EPOCH_NAME

__all__ = ["MID_EPOCH_NAME", "MidEpoch", "Preempted", "StopRequest", "exit_status", "parse_signal",
           "save_mid_epoch", "start_epoch"]

log = logging.getLogger("gfnet.train")


def parse_signal(spec) -> signal.Signals:
    """``spec`` ("TERM", "SIGTERM", "usr1", 15 or a signal.Signals) as a signal.Signals; ValueError if none."""
    if isinstance(spec, int):
        return signal.Signals(spec)
    name = str(spec).strip().upper()
    name = name if name.startswith("SIG") else "SIG" + name
    try:
        return signal.Signals[name]
    except KeyError:
        raise ValueError(f"unknown signal {spec!r}: use a name such as TERM, USR1 or USR2") from None


def exit_status(signum: int) -> int:
    """The exit status of a run stopped by signal ``signum``: 128 + its number (143 for SIGTERM)."""
    return 128 + int(signum)


class Preempted(Exception):
    """A stop signal ended the run after its state was saved (:mod:`gfnet.train.preemption`).

    Attributes: signal (signal.Signals); path (the file to resume from, None without an output folder);
    epoch (finished epochs); step (steps of the next epoch trained, None: stopped at an epoch's end);
    steps (the epoch's planned steps, None if the loader has no len); exit_status (128 + the signal).
    """

    def __init__(self, signum: int, path: Optional[str], epoch: int, step: Optional[int] = None,
                 steps: Optional[int] = None):
        self.signal = signal.Signals(signum)
        self.path, self.epoch, self.step, self.steps = path, epoch, step, steps
        self.exit_status = exit_status(signum)
        where = (f"after epoch {epoch}" if step is None else
                 f"after step {step}{f' of {steps}' if steps else ''} of epoch {epoch + 1}")
        saved = (f"its state is in {path}: continue with --resume auto" if path is not None else
                 "nothing was saved (no output folder)")
        super().__init__(f"stopped by {self.signal.name} {where}; {saved} (exit status {self.exit_status}: "
                         "requeue the job)")


class StopRequest:
    """The stop signals of one training run: their flag, and every process's agreement on it.

    Args:
        signals: the signals to catch (names or numbers); empty: nothing is caught, never stops.
        ctx: the process's DistributedContext; under DDP a gloo group of its own carries the votes
            (made in :meth:`open`, a collective call).

    Handlers can only be set in the main thread; elsewhere the run trains on without them (a warning).
    """

    def __init__(self, signals: Sequence = (), ctx: Optional[DistributedContext] = None):
        self.signals = [parse_signal(s) for s in signals]
        self.ctx = ctx or DistributedContext()
        self.received = 0  # the first stop signal this process caught (0: none)
        self.agreed = 0  # the signal every process stops for, once they agreed (0: go on)
        self._previous: dict = {}
        self._group = None
        self._pending = None  # (work, tensor) of the vote in flight

    def _catch(self, signum, frame) -> None:
        # Only a flag: the handler runs between two bytecodes of the training loop, anywhere.
        if not self.received:
            self.received = signum

    def open(self) -> StopRequest:
        if not self.signals:
            return self
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._catch)
        else:
            log.warning("training runs outside the main thread: %s cannot be caught, the run will not stop "
                        "and save on them", ", ".join(s.name for s in self.signals))
        if self.ctx.enabled:
            self._group = dist.new_group(backend="gloo")
        return self

    def close(self, failed: bool = False) -> None:
        """Settle the vote in flight (not when ``failed``: a peer may be gone) and put the previous handlers
        back, unless the run stopped on a signal: the process is then on its way out, and a second stop
        signal (torchrun's agent passes on the one it got to each worker's process group, and signals the
        workers once one of them has exited) must not kill it before it exits with its status. The
        handler left in place only sets a flag."""
        if self._pending is not None and not failed:
            self._pending[0].wait()
        self._pending = None
        if not self.agreed:
            for s, previous in self._previous.items():
                signal.signal(s, previous)
        self._previous.clear()
        if self._group is not None and not failed:
            dist.destroy_process_group(self._group)
        self._group = None

    def after_step(self) -> bool:
        """Called by every process after each training step: True when all of them stop now.

        Under DDP the vote of the step before is read and this step's is sent (one step of delay, no
        wait for it): every process reads the same result at the same step, so all stop together.
        """
        if not self.signals:
            return False
        if self.agreed or self._group is None:
            self.agreed = self.agreed or self.received
            return bool(self.agreed)
        if self._read_vote():
            return True
        flag = torch.tensor([self.received], dtype=torch.int64)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return False

    def settle(self) -> bool:
        """At a point where every process is in step (after an epoch's save): whether all stop now (the
        vote in flight, then one more, waited for)."""
        if not self.signals:
            return False
        if self.agreed or self._group is None or self._read_vote():
            return self.after_step()
        flag = torch.tensor([self.received], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        self.agreed = int(flag.item())
        return bool(self.agreed)

    def _read_vote(self) -> bool:
        """Wait for the vote in flight, if any; True (and ``agreed`` set) when it says stop."""
        if self._pending is None:
            return False
        work, flag = self._pending
        work.wait()
        self._pending = None
        self.agreed = int(flag.item())
        return bool(self.agreed)


@dataclass
class MidEpoch:
    """Where an unfinished epoch stood on one process when the run stopped.

    Attributes:
        epoch: the epoch (0-based; the checkpoint's ``epoch`` field, the finished ones, equals it).
        step: batches of the epoch's plan trained. steps: the plan's batches (``len(loader)``; None if none).
        batch_size: the loader's per-process batch (None if it does not say).
        world_size: processes of the run.
        loss_sum, correct, bad_steps, images, steps_done, seconds: this process's partial sums of the
            epoch's statistics (what :meth:`gfnet.train.Trainer.train_epoch` sums), so that the epoch's
            record equals an uninterrupted run's.
        signal: the name of the signal that stopped the run.
    """

    epoch: int
    step: int
    steps: Optional[int]
    batch_size: Optional[int]
    world_size: int
    loss_sum: float
    correct: list
    bad_steps: int
    images: int
    steps_done: int
    seconds: float
    signal: str = ""
    source: str = dataclasses.field(default="", repr=False)  # the file it was read from (not stored)

    _PER_PROCESS = ("loss_sum", "correct", "bad_steps", "images", "steps_done", "seconds")

    def to_state(self, ctx: DistributedContext) -> dict:
        """The ``train_state["mid_epoch"]`` entry: the shared position and every process's sums
        (collective under DDP: every process must call it)."""
        mine = {k: getattr(self, k) for k in self._PER_PROCESS}
        shared = {k: v for k, v in dataclasses.asdict(self).items() if k not in self._PER_PROCESS + ("source",)}
        return {**shared, "processes": ctx.all_gather_object(mine)}

    @classmethod
    def from_state(cls, entry: dict, ctx: DistributedContext, path: str) -> MidEpoch:
        """This process's :class:`MidEpoch` from a ``train_state["mid_epoch"]`` entry; ValueError if it
        was written by another number of processes (its position belongs to another data plan)."""
        if int(entry["world_size"]) != ctx.world_size:
            raise ValueError(f"{path} stopped epoch {entry['epoch'] + 1} after step {entry['step']} of "
                             f"{entry['world_size']} process(es); this run has {ctx.world_size}, whose data plan "
                             f"has no such position: resume it with {entry['world_size']} process(es), or resume "
                             f"from the checkpoint.pth.tar beside it to redo the epoch from its start")
        fields = {k: v for k, v in entry.items() if k != "processes"}
        return cls(**fields, **entry["processes"][ctx.rank], source=path)

    def restore(self, loss_sum: torch.Tensor, correct: torch.Tensor, bad_steps: torch.Tensor) -> tuple:
        """Put this process's partial sums into the epoch's accumulators (in place); returns
        (images, steps_done, seconds)."""
        loss_sum.fill_(self.loss_sum)
        correct.copy_(torch.tensor(self.correct, dtype=correct.dtype))
        bad_steps.fill_(self.bad_steps)
        return self.images, self.steps_done, self.seconds

    def check_loader(self, loader) -> None:
        """ValueError when ``loader`` plans the epoch otherwise than the run that stopped (another batch
        size or number of batches: the position would name other images)."""
        try:
            steps = len(loader)
        except TypeError:
            steps = None
        size = getattr(loader, "batch_size", None)
        differ = [f"{what} {was} then, {now} now" for what, was, now in
                  (("batches per epoch", self.steps, steps), ("batch size per process", self.batch_size, size))
                  if None not in (was, now) and was != now]
        if differ:
            raise ValueError(f"{self.source} stopped epoch {self.epoch + 1} after step {self.step}, a position in its "
                             f"data plan, and this run plans the epoch otherwise ({'; '.join(differ)}): resume "
                             "with the same batch size and data, or from the checkpoint.pth.tar beside it to "
                             "redo the epoch from its start")


def save_mid_epoch(trainer, progress: MidEpoch) -> Optional[str]:
    """Write ``trainer``'s state with ``progress`` atomically to ``out_dir/mid_epoch.pth.tar`` (main process;
    collective under DDP). Returns the path (None without an output folder: nothing is written)."""
    if trainer.out_dir is None:
        return None
    obj = trainer.checkpoint()
    obj["train_state"]["mid_epoch"] = progress.to_state(trainer.ctx)
    path = os.path.join(trainer.out_dir, MID_EPOCH_NAME)
    if trainer.ctx.is_main:
        atomic_save(obj, path)
    trainer.ctx.barrier()
    return path


def _takes_start(set_epoch) -> bool:
    try:
        return "start" in inspect.signature(set_epoch).parameters
    except (TypeError, ValueError):
        return False


def start_epoch(loader: Iterable, epoch: int, start: int = 0) -> Iterable:
    """Set ``loader`` to ``epoch`` (``set_epoch``, when it has one) from batch ``start`` on; returns what to
    iterate. A loader whose ``set_epoch`` takes no ``start`` is read from the epoch's first batch and the
    first ``start`` batches are discarded (exact when its order depends only on the epoch)."""
    set_epoch = getattr(loader, "set_epoch", None)
    if set_epoch is not None:
        if start and _takes_start(set_epoch):
            set_epoch(epoch, start=start)
            return loader
        set_epoch(epoch)
    if not start:
        return loader
    log.warning("%s cannot start an epoch at a given batch (its set_epoch takes no start): reading and "
                "discarding the %d batch(es) trained before the run stopped", type(loader).__name__, start)
    return itertools.islice(loader, start, None)
