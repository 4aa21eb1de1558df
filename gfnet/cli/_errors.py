"""One error convention for every ``gfnet-*`` command.

A command's ``main`` runs its body through :func:`run_command`, which turns the errors a user can act on
into one line on stderr, ``gfnet-<cmd>: error: <message>``, and an exit status:

- 2: bad usage or input (argparse's own status for bad arguments): :class:`UsageError`, ``ValueError``
  (gfnet's library raises it for out-of-range arguments and files that are not what they should be,
  :class:`gfnet.checkpoint.CheckpointError` included), missing files, files where folders belong;
- 1: a runtime failure of a valid request: a full disk, a read-only or vanished folder, a training run
  that diverged, a run folder locked by another run, a missing optional dependency;
- 130: interrupted (Ctrl-C);
- 128 + N: a training run stopped by signal N after saving its state (143 for SIGTERM; see
  :mod:`gfnet.train.preemption`): the scheduler requeues it, ``--resume auto`` continues it.

Anything else is a bug of gfnet and keeps its traceback. ``GFNET_DEBUG=1`` shows the traceback of the
one-line errors too.

The checks here (:func:`parse_device`, :func:`prepare_output_dir`, :func:`check_writable_file`, the
argparse types) run before a command starts its work, so that a bad ``--out`` fails in a second, not
after an hour of evaluation or benchmarking.
"""
from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import sys
import tempfile
from typing import Callable

__all__ = ["UsageError", "run_command", "parse_device", "prepare_output_dir", "check_writable_file",
           "positive_int", "nonnegative_int", "positive_float", "nonnegative_float", "int_between", "describe_os_error"]


class UsageError(ValueError):
    """A request that cannot be carried out as given (exit status 2); the message says what to change."""


def describe_os_error(exc: OSError) -> str:
    """``<what> <path>: <strerror>`` for an OSError, with the cause (e.g. "No space left on device") said."""
    reason = exc.strerror or (os.strerror(exc.errno) if exc.errno else None) or str(exc)
    where = exc.filename if exc.filename is not None else None
    hint = {errno.ENOSPC: " (free some space or write elsewhere)",
            errno.EDQUOT: " (free some space or write elsewhere)",
            errno.EROFS: " (write elsewhere)",
            errno.EACCES: " (check its permissions or write elsewhere)"}.get(exc.errno, "")
    return f"{where}: {reason}{hint}" if where else f"{reason}{hint}"


def _runtime_errors() -> tuple:
    # Library error types that mean "a valid request failed at run time" (exit 1), imported lazily so
    # that `--help` stays fast.
    kinds = [ImportError]
    try:
        from gfnet.train.run_folder import RunFolderBusy
        from gfnet.train.trainer import TrainingError
        kinds += [RunFolderBusy, TrainingError]
    except ImportError:  # a broken installation: let the command itself fail with its traceback
        pass
    return tuple(kinds)


def _preempted() -> tuple:
    try:
        from gfnet.train.preemption import Preempted
    except ImportError:
        return ()
    return (Preempted,)


def run_command(prog: str, body: Callable[[], int], on_interrupt: str = "", quiet_stop: bool = False) -> int:
    """Run ``body()`` (a command's work) under the convention of the module docstring; its exit status.
    ``on_interrupt`` is added to the message of a Ctrl-C (what the user can do next); ``quiet_stop``: a
    run stopped by a signal exits with its status without a line (the processes of a job but one)."""
    debug = os.environ.get("GFNET_DEBUG", "") not in ("", "0")
    # A log file that cannot be written (a full disk) must not print a traceback per record.
    logging.raiseExceptions = debug

    def fail(message: str, status: int) -> int:
        if debug:
            import traceback
            traceback.print_exc()
        print(f"{prog}: error: {message}", file=sys.stderr)
        return status

    try:
        return body()
    except KeyboardInterrupt:
        return fail("interrupted" + (f"; {on_interrupt}" if on_interrupt else ""), 130)
    except _preempted() as e:  # not an error: the state is saved, the scheduler is told to requeue
        if not quiet_stop:
            print(f"{prog}: {e}", file=sys.stderr)
        return e.exit_status
    except (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError) as e:
        return fail(describe_os_error(e) if e.filename else str(e), 2)
    except OSError as e:
        return fail(describe_os_error(e), 1)
    except ValueError as e:  # UsageError, CheckpointError and the library's argument checks
        return fail(str(e), 2)
    except _runtime_errors() as e:
        return fail(str(e), 1)


# ---------------------------------------------------------------- checks run before the work
def parse_device(spec):
    """``spec`` ("cpu", "cuda", "cuda:K", None) as a torch.device, or a :class:`UsageError` that says why
    not (an unknown device type, CUDA without a GPU, a GPU index this machine lacks). None stays None."""
    if spec is None:
        return None
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device {spec!r}: use cpu, cuda or cuda:K") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"device {spec!r} is not supported: use cpu, cuda or cuda:K")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: this torch sees no CUDA GPU (no driver, no device, or a "
                             "CPU-only build); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return device


def prepare_output_dir(path: str, what: str = "--out") -> str:
    """Create the output folder ``path`` (and missing parents) and check that files can be written in it.

    Refuses a path that is a file, a folder that cannot be written, and a path whose missing folders
    would start at the filesystem root (``/typo/run``: most likely a mistake, and nothing should be
    created there). Returns the path.
    """
    path = os.fspath(path)
    absolute = os.path.abspath(path)
    if os.path.exists(absolute) and not os.path.isdir(absolute):
        raise UsageError(f"{what} {path} is a file, not a folder: choose a folder")
    if not os.path.isdir(absolute):
        top = absolute
        while not os.path.exists(os.path.dirname(top)):
            top = os.path.dirname(top)
        parent = os.path.dirname(top)
        if not os.path.isdir(parent):
            raise UsageError(f"{what} {path}: {parent} is a file, not a folder")
        if parent == os.path.dirname(parent):  # the filesystem root
            raise UsageError(f"{what} {path} would create {top} at the filesystem root; create it first if "
                             "that is really meant, or check the path")
        os.makedirs(absolute, exist_ok=True)
    _probe_write(absolute, what, path)
    return path


#: Bytes the write probe writes (and fsyncs, then removes): enough to need real disk blocks, so that a full
#: disk or quota fails the check, as creating an empty file does not.
PROBE_BYTES = 64 * 1024


def _probe_write(folder: str, what: str, shown: str) -> None:
    # A real write of real bytes, not os.access: it also catches read-only mounts and full disks (as root,
    # os.access says yes to everything; an empty file needs no free block).
    probe = None
    try:
        fd, probe = tempfile.mkstemp(prefix=".gfnet-write-probe-", dir=folder)
        with os.fdopen(fd, "wb") as fh:
            fh.write(b"\0" * PROBE_BYTES)
            fh.flush()
            os.fsync(fh.fileno())  # network file systems may report a full disk only here
    except OSError as e:
        raise OSError(e.errno, f"{what} is not writable: {e.strerror}", shown) from None
    finally:
        if probe is not None:
            try:
                os.unlink(probe)
            except OSError:
                pass


def check_writable_file(path: str, what: str = "file") -> str:
    """Check, before any work, that ``path`` can be replaced atomically as :func:`gfnet.checkpoint.atomic_save`
    does: it (or, for a symbolic link, its target) is a regular file that can be opened for writing, in a
    folder where a temporary file can be made. Returns the resolved target path."""
    target = os.path.realpath(path)
    if not os.path.exists(target):
        raise FileNotFoundError(errno.ENOENT, f"no {what} at {path}", path)
    if not os.path.isfile(target):
        raise UsageError(f"{path} is not a regular file")
    try:
        with open(target, "ab"):  # opens for writing without changing a byte
            pass
    except OSError as e:
        raise OSError(e.errno, f"the {what} is not writable: {e.strerror}", path) from None
    _probe_write(os.path.dirname(target), f"the {what}'s folder", os.path.dirname(target))
    return target


# ---------------------------------------------------------------- argparse types
def _number(kind, low, inclusive: bool, name: str, high=None):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if value < low or (not inclusive and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {text}")
        return value
    parse.__name__ = name
    return parse


#: argparse ``type=`` for counts and sizes that must be >= 1 (epochs, batch size, classes, ...).
positive_int = _number(int, 1, True, "an integer >= 1")
#: argparse ``type=`` for counts that may be 0 (workers, threads, seed).
nonnegative_int = _number(int, 0, True, "an integer >= 0")
#: argparse ``type=`` for rates that must be finite and > 0.
positive_float = _number(float, 0.0, False, "a number > 0")
#: argparse ``type=`` for weights that must be finite and >= 0 (weight decay, loss ratios).
nonnegative_float = _number(float, 0.0, True, "a number >= 0")


def int_between(low: int, high: int):
    """argparse ``type=`` for an integer in [low, high] (e.g. a JPEG quality, 1..100)."""
    return _number(int, low, True, f"an integer from {low} to {high}", high)
