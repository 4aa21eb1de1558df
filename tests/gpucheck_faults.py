"""Checks that fail for real, for tests/test_gpucheck.py: run by gpucheck's worker processes (which import this
module by name: the tests folder is on their path)."""
import os
import time


def passes(ctx):
    return {"pid": os.getpid()}


def aborts(ctx):
    os.abort()  # a native abort (SIGABRT), as a CUDA assertion or a segfaulting kernel ends a process


def hangs(ctx):
    time.sleep(3600)


def raises(ctx):
    raise AssertionError("the kernel wrote garbage")
