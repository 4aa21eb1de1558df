"""One atomic writer for every file gfnet writes: checkpoints, data indexes and manifests, results JSON,
the demo's files, benchmark results.

:func:`atomic_write` writes to a temporary file in the target's folder (``.<name>.<host>-<pid>.XXXX.gfnet-tmp``),
flushes and fsyncs it, gives it the permissions the file had (or a new file's usual ones), and renames it over
the target: a reader, a crash or a kill never sees half a file. :func:`atomic_save` (torch.save),
:func:`atomic_write_text` and :func:`atomic_copy` are its three uses. Only regular files (or links to one) are
replaced (:func:`replaceable_target`); the temporary files of killed writers are removed by the next write into
the folder (:func:`remove_stale_temps`). A leaf module: it imports no other part of gfnet.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import tempfile
import time
from typing import Any, Callable, Optional

__all__ = ["STALE_TEMP_SECONDS", "atomic_copy", "atomic_save", "atomic_write", "atomic_write_text",
           "remove_stale_temps", "replaceable_target"]

#: Temporary files of :func:`atomic_write`: ``.<name>.<host>-<pid>.<random>.gfnet-tmp`` beside the target.
_TEMP_RE = re.compile(r"^\..*\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.[a-z0-9_]+\.gfnet-tmp$")
#: Earlier gfnet builds named their temporary files `.tmp-XXXXXXXX.pth` (no owner in the name: removed
#: once 10 minutes old).
_LEGACY_TEMP_RE = re.compile(r"^\.tmp-[a-z0-9_]{8}\.pth$")
#: Seconds a temporary file must have stood unmodified before a save that holds the run folder's lock removes it
#: whoever wrote it (another host, a pid this host reuses): a live save writes its file without pauses that long.
STALE_TEMP_SECONDS = 600


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _process_start_time(pid: int) -> Optional[float]:
    """When process ``pid`` of this host started (seconds since the epoch), where /proc tells (Linux), else None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces
        with open("/proc/stat", "rb") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith(b"btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _writer_gone(pid: int, mtime: float) -> bool:
    """The process of this host that named a temporary file ``pid`` can no longer be writing it: it is gone,
    or the pid now belongs to a process that started after the file was last written (the pid was reused)."""
    if not _process_alive(pid):
        return True
    started = _process_start_time(pid)
    return started is not None and started > mtime + 2.0  # slack: the boot time in /proc is whole seconds


def remove_stale_temps(folder: str, lock_held: bool = False) -> list:
    """Delete the temporary files that killed :func:`atomic_write` calls left in ``folder``; returns their paths.

    Only gfnet's own names (``.NAME.HOST-PID.XXXX.gfnet-tmp``) are touched:

    - a file of this host whose process is gone, or whose pid now belongs to a process that started after the
      file was last written (a reused pid), is removed at once;
    - with ``lock_held`` (the caller holds the run folder's lock, :mod:`gfnet.train.run_folder`, so no other
      gfnet run writes into this folder), any file untouched for :data:`STALE_TEMP_SECONDS` is removed, whatever
      host wrote it: the killed saves of another node of a multi-node job, which this host cannot ask about;
    - without the lock, the files of other hosts stay (their writer may be alive);
    - earlier gfnet builds' ``.tmp-*.pth`` files go once 10 minutes old.
    """
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    host = _host_tag()
    now = time.time()
    for name in names:
        m = _TEMP_RE.match(name)
        legacy = m is None and _LEGACY_TEMP_RE.match(name) is not None
        if m is None and not legacy:
            continue
        try:
            mtime = os.stat(os.path.join(folder, name)).st_mtime
        except OSError:
            continue
        old = now - mtime > STALE_TEMP_SECONDS
        if legacy:
            stale = old
        else:
            stale = (m.group("host") == host and _writer_gone(int(m.group("pid")), mtime)) or (lock_held and old)
        if stale:
            try:
                os.unlink(os.path.join(folder, name))
                removed.append(os.path.join(folder, name))
            except OSError:
                pass
    return removed


def replaceable_target(path: str) -> str:
    """The file that an atomic replace of ``path`` writes: ``path`` itself, or the target of the symbolic
    link(s) it is. Refuses anything else than a regular file or a path that does not exist yet: renaming a
    new file over a named pipe, a socket or a device file (``/dev/null``, ``/dev/full``) would delete it and
    leave a regular file in its place; over a folder it would fail half-way.

    Raises:
        ValueError: the path (or its link's target) exists and is not a regular file.
    """
    path = os.fspath(path)
    target = os.path.realpath(path)
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return target
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode)
                else "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        via = f" (through the link to {target})" if target != os.path.abspath(path) else ""
        raise ValueError(f"{path}{via} is {kind}, not a regular file: gfnet writes only regular files (or a "
                         "symbolic link to one), never over a pipe or a device; give another path")
    return target


class _ErrorKeepingWriter:
    # torch.save reports an exception of a write (a full disk's OSError, a Ctrl-C's KeyboardInterrupt that
    # arrives while its C++ writer calls back into Python) as a RuntimeError "unexpected pos ...", with the
    # cause only in the exception's context; keeping it lets atomic_save raise the cause itself.
    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except BaseException as e:
            self.error = e
            raise

    def flush(self):
        return self.f.flush()


def _interrupt_behind(error: BaseException) -> Optional[BaseException]:
    """The KeyboardInterrupt (or SystemExit) that a RuntimeError of torch.save hides: an interrupt that arrives
    while its zip writer calls back into Python leaves the writer half-way, and closing it then fails with
    "unexpected pos", the interrupt only in the exception's context."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            return error
        error = error.__context__
    return None


def atomic_write(path: str, write: Callable[[Any], None], text: bool = False) -> None:
    """Write ``path`` atomically: ``write(f)`` fills a temporary file in the same folder, which is then renamed
    over ``path``; a crash never leaves half a file.

    ``text``: ``f`` is a UTF-8 text file (else binary). A symbolic link is written through (the link stays,
    its target gets the new content); an existing file keeps its permission bits and, where allowed, its
    owner (a 0600 file stays 0600; a new file gets 0666 less the umask). Only a regular file is replaced
    (:func:`replaceable_target`). Stale temporary files of killed writes in that folder are removed first
    (:func:`remove_stale_temps`). An interrupt (Ctrl-C) while writing removes the temporary file and raises
    KeyboardInterrupt; the old file stays.

    Raises:
        OSError: the write failed; its message names ``path`` and the cause ("No space left on device").
        ValueError: ``path`` is a named pipe, a device file, a folder (or a link to one).
    """
    path = os.fspath(path)
    target = replaceable_target(path)
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    remove_stale_temps(folder)
    try:
        old = os.stat(target)
    except FileNotFoundError:
        old = None
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)[:100]}.{_host_tag()}-{os.getpid()}.",
                               suffix=".gfnet-tmp", dir=folder)
    try:
        with (os.fdopen(fd, "w", encoding="utf-8") if text else os.fdopen(fd, "wb")) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if old is not None:
            os.chmod(tmp, stat.S_IMODE(old.st_mode))
            if hasattr(os, "chown") and (old.st_uid, old.st_gid) != (os.getuid(), os.getgid()):
                try:
                    os.chown(tmp, old.st_uid, old.st_gid)
                except OSError:  # only root may give a file away; keep ours
                    pass
        else:  # mkstemp creates the file private (0600); give it the usual permissions of a new file.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None and e.errno:
            raise OSError(e.errno, f"cannot write it: {e.strerror}", path) from None
        raise


def atomic_save(obj: Any, path: str) -> None:
    """torch.save ``obj`` to ``path`` through :func:`atomic_write` (same guarantees and errors)."""
    import torch

    def save(f) -> None:
        writer = _ErrorKeepingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError as e:
            cause = writer.error or _interrupt_behind(e)
            if cause is not None:
                raise cause from None
            raise

    atomic_write(path, save)


def atomic_write_text(path: str, text: str) -> None:
    """Write the string ``text`` (UTF-8) to ``path`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: f.write(text), text=True)


def atomic_copy(source: str, path: str) -> None:
    """Copy the bytes of file ``source`` to ``path`` through :func:`atomic_write` (nothing is deserialised)."""
    with open(source, "rb") as src:
        atomic_write(path, lambda f: shutil.copyfileobj(src, f, 1 << 20))
