"""Checks that fail for real, for tests/test_gpucheck.py: run by gpucheck's worker processes (which import this
module by name: the tests folder is on their path)."""
import os
import sys
import time


def passes(ctx):
    return {"pid": os.getpid()}


def aborts(ctx):
    os.abort()  # a native abort (SIGABRT), as a CUDA assertion or a segfaulting kernel ends a process


def hangs(ctx):
    time.sleep(3600)


def raises(ctx):
    raise AssertionError("the kernel wrote garbage")


def starts_a_child_and_hangs(ctx):
    """A check whose child process (a test runner, a compiler) outlives its deadline; the child writes its pid."""
    from gfnet.bench.gpucheck import run_tied
    path = os.path.join(ctx.out_dir, "child.pid")
    run_tied([sys.executable, "-c", f"import os, time; open({path!r}, 'w').write(str(os.getpid())); "
                                    "time.sleep(600)"])
