"""A training run's output folder: one run per folder, held under a lock, found again to resume.

The folder holds ``checkpoint.pth.tar`` (the last finished epoch), ``model_best.pth.tar`` (the best
epoch), ``train.log``, the lock file ``.gfnet-run.lock`` and, after a run was stopped by a signal in the
middle of an epoch, ``mid_epoch.pth.tar`` (:mod:`gfnet.train.preemption`). The rules:

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
  never blocks a resume. The lock is the training process's alone: a flock belongs to the open file,
  which a forked child (a DataLoader worker) would share and keep locked after its parent's death, so
  every child that Python forks closes its copy at once (``os.register_at_fork``). A lock still held
  after the recorded holder died (by a child forked outside Python) is waited for a few seconds, then
  reported with the processes that hold it, never as a live run.
- ``resume="auto"`` resumes from the newest of the files that hold a training state (the best file
  can be newer: the trainer writes it first; see :meth:`gfnet.train.Trainer.save`; a mid-epoch state of
  the same run is newer than the epoch-boundary files of the epochs it follows), else starts fresh.
- :meth:`RunFolder.reconcile_best` keeps ``model_best.pth.tar`` the best epoch's after a resume.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from typing import Optional

from gfnet.checkpoint import CheckpointError, atomic_save, remove_stale_temps, torch_load

__all__ = ["RunFolder", "RunFolderBusy", "RunInfo", "read_run_info", "LOCK_NAME", "MID_EPOCH_NAME", "REPLACED_SUFFIX"]

log = logging.getLogger("gfnet.train")

LOCK_NAME = ".gfnet-run.lock"
#: The old run's files that an ``overwrite`` run moved aside: ``.<name>.gfnet-replaced``.
REPLACED_SUFFIX = ".gfnet-replaced"
#: The state of a run stopped in the middle of an epoch (never a finished epoch's: see gfnet.train.preemption).
MID_EPOCH_NAME = "mid_epoch.pth.tar"


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder's lock."""


#: Lock file descriptors this process holds, fd -> pid of the holder (see :func:`_drop_inherited_locks`).
_HELD_LOCKS: dict = {}


def _drop_inherited_locks() -> None:
    """In a child that Python forked (a DataLoader worker): close the inherited copies of the run folders'
    lock files. A flock belongs to the open file, shared by every copy of its descriptor, so a child that
    kept one would hold its parent's run folder locked after the parent's death (a DataLoader worker
    outlives a killed parent by seconds). Closing a copy leaves the parent's lock in place; unlocking it
    would not."""
    for fd in list(_HELD_LOCKS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)

_HOLDER = re.compile(r"^pid (\d+) on (\S+),")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _open_by(pid: str, st: os.stat_result) -> Optional[bool]:
    """Whether process ``pid`` has the file ``st`` describes open (None: cannot tell, e.g. no /proc)."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False if os.path.isdir("/proc/self/fd") else None
    except OSError:
        return None
    for name in names:
        try:
            other = os.stat(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            return True
    return False


def _processes_holding(path: str) -> list:
    """The pids (this process's excepted) that have ``path`` open, as far as /proc lets us see."""
    try:
        st = os.stat(path)
        pids = [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
    except OSError:
        return []
    return sorted(int(p) for p in pids if _open_by(p, st))


@dataclass(frozen=True)
class RunInfo:
    """What a training checkpoint says about its run (read without loading weights into a model).

    Attributes: path; run_id (None in files of earlier gfnet builds); stage; epoch (finished epochs);
    epochs (the run's planned total); acc (of its last finished epoch); best_acc; best_epoch (the epoch
    whose weights ``model_best.pth.tar`` should hold; 0: none yet); step (a mid-epoch state: the steps of
    epoch ``epoch + 1`` it has trained; None: the state at the end of epoch ``epoch``).
    """

    path: str
    run_id: Optional[str]
    stage: int
    epoch: int
    epochs: Optional[int]
    acc: Optional[float]
    best_acc: float
    best_epoch: int
    step: Optional[int] = None


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
    mid = state.get("mid_epoch")
    return RunInfo(path=path, run_id=state.get("run_id"), stage=int(state.get("stage", 0)),
                   epoch=int(obj.get("epoch") or 0), epochs=options.get("epochs"), acc=obj.get("acc"),
                   best_acc=float(obj.get("best_acc") or 0.0), best_epoch=best_epoch_of(obj),
                   step=int(mid["step"]) if isinstance(mid, dict) else None)


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
        self.mid_epoch_path = os.path.join(self.path, MID_EPOCH_NAME)
        self._lock_fd: Optional[int] = None

    #: Seconds to wait for a lock whose recorded holder is dead (held by processes it left behind) to be let go.
    orphan_wait_s = 15.0

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
        """Take the folder's lock (non-blocking, see the module docstring) and nothing else; RunFolderBusy if a
        live run holds it. ``purpose`` is added to the holder's description that a refused process shows
        (e.g. "gfnet-eval --write")."""
        os.makedirs(self.path, exist_ok=True)
        lock = os.path.join(self.path, LOCK_NAME)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._lock_or_explain(fd, lock)
        except BaseException:
            os.close(fd)
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
        _HELD_LOCKS[fd] = os.getpid()

    def _lock_or_explain(self, fd: int, lock: str) -> None:
        """flock ``fd``, or raise RunFolderBusy naming the live run that holds it. A lock whose recorded
        holder is gone (or never had it open) is held by processes that holder left behind: waited for
        up to :attr:`orphan_wait_s`, then reported as such."""
        deadline = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if deadline is not None:
                    log.info("%s: the lock left behind by a dead run was let go; taking it", self.path)
                return
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
            holder = ""
            try:
                holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
            except OSError:
                pass
            found = _HOLDER.match(holder)
            dead = None
            if found and found.group(2) == socket.gethostname():
                pid = int(found.group(1))
                dead = not _pid_alive(pid) or _open_by(str(pid), os.fstat(fd)) is False
            if not dead:
                raise RunFolderBusy(f"{self.path} is in use by another training run ({holder or 'unknown process'}):"
                                    " wait for it to end, or choose another --out")
            if deadline is None:
                deadline = time.monotonic() + self.orphan_wait_s
                log.warning("%s: its lock is held, but its holder (pid %s) is gone; waiting up to %.0f s for the "
                            "processes it left behind to let it go", self.path, found.group(1), self.orphan_wait_s)
            if time.monotonic() >= deadline:
                others = _processes_holding(lock)
                who = (f"process(es) {', '.join(map(str, others))}" if others else "processes")
                raise RunFolderBusy(f"{self.path} is locked by {who} left behind by training run pid "
                                    f"{found.group(1)}, which is gone: wait for them to end or stop them, then "
                                    "resume")
            time.sleep(0.2)

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
            if _HELD_LOCKS.pop(self._lock_fd, None) is not None:  # not in a forked child: it closed its copy
                os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------------ what the folder holds
    def run_files(self) -> list:
        """The run's checkpoint files present in the folder (checkpoint first, the mid-epoch state last). Where
        an ``overwrite`` run stopped before its first state was saved, the earlier run's files it moved aside
        (put back at the next start)."""
        pending = self._replaced()
        if pending and not self._replacing_run_saved(pending):
            return [self._aside(p) for p in pending]
        return [p for p in self._run_paths() if os.path.exists(p)]

    def _run_paths(self) -> tuple:
        return (self.checkpoint_path, self.best_path, self.mid_epoch_path)

    def _replacing_run_saved(self, pending: list) -> bool:
        """Whether an ``overwrite`` run has saved a state of its own: an epoch's checkpoint, or a mid-epoch
        state that is not one of the earlier run's files moved aside (a run preempted in its first epoch)."""
        return os.path.exists(self.checkpoint_path) or (
            self.mid_epoch_path not in pending and os.path.exists(self.mid_epoch_path))

    def _describe(self, files: list) -> str:
        try:
            info = read_run_info(files[0])
            return (f"stage {info.stage}, epoch {info.epoch}"
                    + (f" of {info.epochs}" if info.epochs else "")
                    + (f" and {info.step} step(s) of the next" if info.step is not None else "")
                    + f", {os.path.basename(files[0])}")
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
            mid = next((i for i in infos if i.path == self.mid_epoch_path), None)
            ends = [i for i in infos if i is not mid]
            if mid is not None and self._mid_epoch_continues(mid, ends):
                return mid.path
            if not ends:
                return None
            runs = {i.run_id for i in ends}
            if len(runs) > 1 and None not in runs:  # a best file copied in from another run: not this run's state
                log.warning("%s and %s belong to different runs; resuming from the checkpoint",
                            *(i.path for i in ends))
                return self.checkpoint_path
            # The newest state; on a tie the checkpoint (it is written after the best file).
            newest = max(ends, key=lambda i: (i.epoch, i.path == self.checkpoint_path))
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

    def _mid_epoch_continues(self, mid: RunInfo, ends: list) -> bool:
        """Whether the mid-epoch state ``mid`` is the newest state of the run that the epoch-boundary files
        ``ends`` hold (it is stale once a later epoch has finished: the trainer deletes it after that
        epoch's save, and a kill in between leaves it behind)."""
        if mid.step is None:
            log.warning("%s holds no mid-epoch state; --resume auto ignores it", mid.path)
            return False
        anchor = next((i for i in ends if i.path == self.checkpoint_path), ends[0] if ends else None)
        if anchor is not None and None not in (anchor.run_id, mid.run_id) and anchor.run_id != mid.run_id:
            log.warning("%s belongs to another run than %s; --resume auto ignores it", mid.path, anchor.path)
            return False
        if any(i.epoch > mid.epoch for i in ends):
            log.info("%s (%d step(s) into epoch %d) is older than the epochs finished since; ignored", mid.path,
                     mid.step, mid.epoch + 1)
            return False
        return True

    def discard_mid_epoch(self) -> None:
        """Delete the mid-epoch state once a later finished epoch has superseded it (main process)."""
        try:
            os.unlink(self.mid_epoch_path)
        except FileNotFoundError:
            return
        log.info("removed %s: a finished epoch supersedes it", self.mid_epoch_path)

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
        return [p for p in self._run_paths() if os.path.exists(self._aside(p))]

    def settle_replaced(self) -> None:
        """Finish or undo an ``overwrite`` (the lock must be held; nothing happens without it).

        If the folder holds a ``checkpoint.pth.tar`` (or a mid-epoch state of its own) the replacing run has
        saved its first state: the earlier run's files moved aside are deleted. Otherwise the replacing run
        stopped before (an error, an interrupt, a kill): they are put back, and a best file that the stopped
        run wrote is removed, so that the folder holds the earlier run as it was. Idempotent: called on every
        start and after every save.
        """
        if self._lock_fd is None:
            return
        pending = self._replaced()
        if not pending:
            return
        if self._replacing_run_saved(pending):
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
          ``source`` is that epoch's own checkpoint: ``source`` is copied over it (atomically). A
          mid-epoch ``source`` holds no finished epoch's weights: the checkpoint of the epoch it follows
          is copied instead, if the folder still holds it.
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
        copy_from = source if info.step is None else self._finished_epoch_file(info)
        if info.best_epoch == info.epoch and copy_from is not None:
            atomic_save(torch_load(copy_from), best)
            log.warning("%s %s; restored the best epoch (%d) from %s", best,
                        "was missing" if have is None else f"held epoch {have.epoch}", info.best_epoch, copy_from)
        else:
            log.warning("%s %s, but the best epoch is %d and its weights are no longer stored; the next "
                        "improving epoch writes it again", best,
                        "is missing" if have is None else f"holds epoch {have.epoch}", info.best_epoch)
        return None

    def _finished_epoch_file(self, mid: RunInfo) -> Optional[str]:
        """The checkpoint of the epoch that mid-epoch state ``mid`` follows, if the folder holds it."""
        try:
            info = read_run_info(self.checkpoint_path)
        except (OSError, CheckpointError):
            return None
        same_run = None in (info.run_id, mid.run_id) or info.run_id == mid.run_id
        return self.checkpoint_path if same_run and info.step is None and info.epoch == mid.epoch else None
