"""A training run's output folder: one run per folder, held under a lock, found again to resume.

The folder holds ``checkpoint.pth.tar`` (the last finished epoch), ``model_best.pth.tar`` (the best
epoch), ``train.log`` and the lock file ``.gfnet-run.lock``. The rules:

- One run per folder: a new run refuses a folder that already holds one, unless asked to resume it
  (``resume="auto"`` or a path) or to replace it (``overwrite=True``). Resuming another run's file into a
  folder that holds a different run is refused too. Runs are told apart by the ``run_id`` their
  checkpoints store.
- Replacing a run loses nothing until the new run has a checkpoint: ``overwrite`` moves the old run's two
  files aside (``.checkpoint.pth.tar.gfnet-replaced``, ...); they are deleted once the new run has written
  its first ``checkpoint.pth.tar`` and put back if it stops before (an error, Ctrl-C, or, at the next
  start in the folder, a kill): :meth:`RunFolder.settle_replaced`.
- One process at a time: the main process holds an exclusive ``flock`` on the lock file while it
  trains; a second run into the folder fails at once with the holder's pid. The operating system
  releases the lock when the holder dies, however it dies (``kill -9`` included), so a stale lock
  never blocks a resume.
- ``resume="auto"`` resumes from the newest of the two files that hold a training state (the best file
  can be newer: the trainer writes it first; see :meth:`gfnet.train.Trainer.save`), else starts fresh.
- :meth:`RunFolder.reconcile_best` keeps ``model_best.pth.tar`` the best epoch's after a resume.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Optional

from gfnet.checkpoint import CheckpointError, atomic_save, remove_stale_temps, torch_load

__all__ = ["RunFolder", "RunFolderBusy", "RunInfo", "read_run_info", "LOCK_NAME", "REPLACED_SUFFIX"]

log = logging.getLogger("gfnet.train")

LOCK_NAME = ".gfnet-run.lock"
#: The old run's files that an ``overwrite`` run moved aside: ``.<name>.gfnet-replaced``.
REPLACED_SUFFIX = ".gfnet-replaced"


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder's lock."""


@dataclass(frozen=True)
class RunInfo:
    """What a training checkpoint says about its run (read without loading weights into a model).

    Attributes: path; run_id (None in files of earlier gfnet builds); stage; epoch (finished epochs);
    epochs (the run's planned total); acc (of its last epoch); best_acc; best_epoch (the epoch whose
    weights ``model_best.pth.tar`` should hold; 0: none yet).
    """

    path: str
    run_id: Optional[str]
    stage: int
    epoch: int
    epochs: Optional[int]
    acc: Optional[float]
    best_acc: float
    best_epoch: int


def best_epoch_of(obj: dict) -> int:
    """The best epoch of a training checkpoint: stored by this gfnet, else derived from its history
    (the first epoch whose accuracy equals ``best_acc``)."""
    state = obj.get("train_state") or {}
    if state.get("best_epoch") is not None:
        return int(state["best_epoch"])
    best = obj.get("best_acc")
    for record in state.get("history") or []:
        if best is not None and record.get("acc") == best and best > 0:
            return int(record["epoch"])
    return 0


def read_run_info(path: str, obj: Optional[dict] = None) -> RunInfo:
    """The :class:`RunInfo` of training checkpoint ``path`` (or of its already loaded dict ``obj``).

    Raises:
        CheckpointError: the file is unreadable, not a checkpoint, or holds no training state.
    """
    obj = torch_load(path, mmap=True) if obj is None else obj
    if not isinstance(obj, dict) or "model_state_dict" not in obj:
        raise CheckpointError(f"{path} is not a gfnet or reference GFNet checkpoint (no 'model_state_dict' field)")
    state = obj.get("train_state")
    if not isinstance(state, dict):
        if "optimizer" in obj and "epoch" in obj:  # the reference train.py's own file: no run identity
            return RunInfo(path=path, run_id=None, stage=0, epoch=int(obj.get("epoch") or 0), epochs=None,
                           acc=obj.get("acc"), best_acc=float(obj.get("best_acc") or 0.0), best_epoch=0)
        raise CheckpointError(f"{path} holds no training state: it is not a checkpoint written during training "
                              "(by gfnet-train or the reference's train.py); to start a stage from its weights, "
                              "use --checkpoint")
    options = state.get("options") or {}
    return RunInfo(path=path, run_id=state.get("run_id"), stage=int(state.get("stage", 0)),
                   epoch=int(obj.get("epoch") or 0), epochs=options.get("epochs"), acc=obj.get("acc"),
                   best_acc=float(obj.get("best_acc") or 0.0), best_epoch=best_epoch_of(obj))


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class RunFolder:
    """The output folder of one training run; see the module docstring.

    Args:
        path: the folder (created when missing).
        checkpoint_name, best_name: the two file names (the reference's by default).
    """

    def __init__(self, path: str, checkpoint_name: str = "checkpoint.pth.tar",
                 best_name: str = "model_best.pth.tar"):
        self.path = os.fspath(path)
        self.checkpoint_path = os.path.join(self.path, checkpoint_name)
        self.best_path = os.path.join(self.path, best_name)
        self._lock_fd: Optional[int] = None

    # ------------------------------------------------------------------ the lock
    def acquire(self) -> None:
        """Create the folder, take its lock (non-blocking) and remove stale temporary files of killed saves.

        Raises:
            RunFolderBusy: another live process holds the lock.
            OSError: the folder cannot be created or written.
        """
        self.acquire_lock_only()
        self.settle_replaced()
        # Under the lock no other gfnet run writes here: old temporary files of any host are a killed save's.
        for path in remove_stale_temps(self.path, lock_held=True):
            log.info("removed %s, the temporary file of a save that was killed", path)

    def acquire_lock_only(self, purpose: str = "") -> None:
        """Take the folder's lock (non-blocking) and nothing else; ``purpose`` is added to the holder's
        description that a refused process shows (e.g. "gfnet-eval --write")."""
        os.makedirs(self.path, exist_ok=True)
        lock = os.path.join(self.path, LOCK_NAME)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            try:
                holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
            except OSError:
                pass
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderBusy(f"{self.path} is in use by another training run ({holder or 'unknown process'}):"
                                    " wait for it to end, or choose another --out") from None
            raise
        # Who holds it, for the message of a second run (the lock itself is the flock, not this text).
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                          f"{', ' + purpose if purpose else ''}\n".encode(), 0)
        except OSError as e:  # e.g. a full disk: said with the file's name
            os.close(fd)
            raise OSError(e.errno, f"cannot write the run folder's lock file: {e.strerror}", lock) from None
        self._lock_fd = fd

    def check(self, resume: Optional[str] = None, overwrite: bool = False) -> None:
        """Fail early, before a run builds its model and data: the errors that :meth:`acquire` and
        :meth:`resolve_resume` would raise for this request, without changing anything (a busy lock is
        probed and let go at once; the real check happens again when the run starts)."""
        if os.path.isdir(self.path):
            lock = os.path.join(self.path, LOCK_NAME)
            if os.path.exists(lock):
                probe = RunFolder(self.path)
                probe.acquire_lock_only()
                probe.release()
        existing = self.run_files()
        if resume is None and existing and not overwrite:
            raise ValueError(self._occupied(existing))
        if resume == "auto":
            for p in existing:
                read_run_info(p)
        elif resume is not None:
            if not os.path.isfile(resume):
                raise FileNotFoundError(errno.ENOENT, "no checkpoint to resume from", resume)
            read_run_info(resume)

    def _occupied(self, existing: list) -> str:
        return (f"{self.path} already holds a training run ({self._describe(existing)}): pass --resume auto to "
                "continue it, --overwrite to replace it, or choose another --out")

    def release(self) -> None:
        """Release the lock (the lock file stays: deleting it would race with a process taking it)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------------ what the folder holds
    def run_files(self) -> list:
        """The run's checkpoint files present in the folder (checkpoint first). Where an ``overwrite`` run stopped
        before its first checkpoint, the earlier run's files it moved aside (put back at the next start)."""
        files = [p for p in (self.checkpoint_path, self.best_path) if os.path.exists(p)]
        if not os.path.exists(self.checkpoint_path) and self._replaced():
            return [self._aside(p) for p in self._replaced()]
        return files

    def _describe(self, files: list) -> str:
        try:
            info = read_run_info(files[0])
            return (f"stage {info.stage}, epoch {info.epoch}"
                    + (f" of {info.epochs}" if info.epochs else "") + f", {os.path.basename(files[0])}")
        except CheckpointError:
            return ", ".join(os.path.basename(p) for p in files)

    def resolve_resume(self, resume: Optional[str], overwrite: bool = False) -> Optional[str]:
        """The file to resume from (None: start fresh), enforcing one run per folder.

        Args:
            resume: None (a new run), "auto" (the folder's newest training state, if any) or a path.
            overwrite: allow a new run (or another run's file) to replace the run in the folder; its
                checkpoint files are deleted here.
        Raises:
            ValueError: the folder holds a run and neither resume nor overwrite allows replacing it.
            CheckpointError: a file to resume from is unreadable or holds no training state.
        """
        existing = self.run_files()
        if resume == "auto":
            if overwrite:
                raise ValueError("--resume auto continues the run in the folder; --overwrite replaces it: "
                                 "give one of them")
            infos = []
            for p in existing:
                try:
                    infos.append(read_run_info(p))
                except CheckpointError as e:
                    raise CheckpointError(f"{e}. --resume auto cannot continue from it: move it out of {self.path} "
                                          "(to resume from the other checkpoint file, if any) or pass --overwrite "
                                          "to start over") from None
            if not infos:
                return None
            runs = {i.run_id for i in infos}
            if len(runs) > 1 and None not in runs:  # a best file copied in from another run: not this run's state
                log.warning("%s and %s belong to different runs; resuming from the checkpoint", *existing)
                return self.checkpoint_path
            # The newest state; on a tie the checkpoint (it is written after the best file).
            newest = max(infos, key=lambda i: (i.epoch, i.path == self.checkpoint_path))
            return newest.path
        if resume is None:
            if existing and not overwrite:
                raise ValueError(self._occupied(existing))
            self._remove(existing)
            return None
        resume = os.fspath(resume)
        if not os.path.isfile(resume):
            raise FileNotFoundError(errno.ENOENT, "no checkpoint to resume from", resume)
        others = [p for p in existing if not _same_file(p, resume)]
        if others and len(others) == len(existing):  # the file comes from elsewhere
            mine = read_run_info(resume)
            theirs = [read_run_info(p).run_id for p in others]
            if not overwrite and not (mine.run_id is not None and all(r == mine.run_id for r in theirs)):
                raise ValueError(f"{self.path} holds another training run ({self._describe(others)}); resuming "
                                 f"{resume} there would replace it: choose another --out, or pass --overwrite")
            if overwrite:
                self._remove(others)
        return resume

    def _remove(self, files: list) -> None:
        # Moved aside, not deleted: the earlier run stays recoverable until this one has a checkpoint.
        for p in files:
            os.replace(p, self._aside(p))
        if files:
            log.warning("--overwrite: moved %s of the earlier run aside; deleted once this run has written its "
                        "first checkpoint, put back if it stops before", " and ".join(files))

    def _aside(self, path: str) -> str:
        return os.path.join(self.path, f".{os.path.basename(path)}{REPLACED_SUFFIX}")

    def _replaced(self) -> list:
        """The run files that an ``overwrite`` moved aside and that are still there (their original paths)."""
        return [p for p in (self.checkpoint_path, self.best_path) if os.path.exists(self._aside(p))]

    def settle_replaced(self) -> None:
        """Finish or undo an ``overwrite`` (the lock must be held; nothing happens without it).

        If the folder holds a ``checkpoint.pth.tar`` the replacing run has written its first checkpoint: the
        earlier run's files moved aside are deleted. Otherwise the replacing run stopped before (an error, an
        interrupt, a kill): they are put back, and a best file that the stopped run wrote is removed, so that
        the folder holds the earlier run as it was. Idempotent: called on every start and after every save.
        """
        if self._lock_fd is None:
            return
        pending = self._replaced()
        if not pending:
            return
        if os.path.exists(self.checkpoint_path):
            for p in pending:
                os.unlink(self._aside(p))
                log.info("--overwrite: deleted the earlier run's %s (the new run has its first checkpoint)", p)
            return
        if self.best_path not in pending and os.path.exists(self.best_path):
            os.unlink(self.best_path)  # written by the replacing run, which never finished an epoch's save
        for p in pending:
            os.replace(self._aside(p), p)
        log.warning("put back the earlier run's %s: the run that was to replace it (--overwrite) stopped before "
                    "writing its first checkpoint", " and ".join(pending))

    # ------------------------------------------------------------------ the best model
    def reconcile_best(self, source: str, info: RunInfo) -> Optional[RunInfo]:
        """Make ``model_best.pth.tar`` agree with the state resumed from ``source`` (described by ``info``).

        - The best file is newer than ``source`` (a run killed between writing the best file and the
          checkpoint, resumed from the checkpoint): it holds a finished, better epoch; returns its
          :class:`RunInfo`, whose best accuracy and epoch the resumed run adopts.
        - It is missing, unreadable or older than the best epoch that ``source`` records while
          ``source`` is that epoch's own checkpoint: ``source`` is copied over it (atomically).
        - Otherwise a mismatch that cannot be repaired is logged.
        Returns None when nothing is to be adopted.
        """
        best = self.best_path
        if _same_file(best, source):
            return None
        have = None
        if os.path.exists(best):
            try:
                have = read_run_info(best)
            except CheckpointError as e:
                log.warning("%s", e)
        if have is not None and info.run_id is not None and have.run_id not in (None, info.run_id):
            log.warning("%s belongs to another run (run id %s, not %s); left as it is", best, have.run_id,
                        info.run_id)
            return None
        if have is not None and have.epoch > info.epoch:
            log.warning("%s holds epoch %d, newer than %s (epoch %d): keeping it as this run's best "
                        "(accuracy %.2f)", best, have.epoch, source, info.epoch, have.best_acc)
            return have
        if have is not None and have.epoch == info.best_epoch:
            return None
        if info.best_epoch == 0:
            return None
        if info.best_epoch == info.epoch:
            atomic_save(torch_load(source), best)
            log.warning("%s %s; restored the best epoch (%d) from %s", best,
                        "was missing" if have is None else f"held epoch {have.epoch}", info.best_epoch, source)
        else:
            log.warning("%s %s, but the best epoch is %d and its weights are no longer stored; the next "
                        "improving epoch writes it again", best,
                        "is missing" if have is None else f"holds epoch {have.epoch}", info.best_epoch)
        return None

