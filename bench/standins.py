"""CPU stand-ins for what only a GPU has, so that the tests and ``gfnet-bench gpucheck --dry-run`` run the GPU code
paths on a CPU and meet the failures that a GPU would give them.

- :func:`emulated_graphs`: the engine's CUDA-graph machinery (``gfnet.engine.GRAPHS``) replaced, while the block
  runs, by :class:`EmulatedGraphs`, which captures by running and replays by running again, and refuses a capture
  for the reasons a real capture fails.
- :func:`fake_gpus`: ``torch.cuda``'s device count and properties answered as a machine with GPUs would.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch

__all__ = ["EmulatedGraphs", "GraphStandIn", "emulated_graphs", "fake_gpus"]


class _FirstSight:
    """Notes every convolution module's call (the module, input shape, dtype, autocast state), and what a capture
    meets that no earlier call met: cuDNN's benchmark mode times the algorithms of such a convolution then, which a
    capture cannot record. A global forward pre-hook, active while installed."""

    def __init__(self):
        self.seen: set = set()
        self.capturing = False
        self.unseen: list = []
        self._handle = None

    def _hook(self, module, args):
        if isinstance(module, torch.nn.modules.conv._ConvNd) and args and isinstance(args[0], torch.Tensor):
            x = args[0]
            key = (id(module), tuple(x.shape), x.dtype, torch.is_autocast_enabled(x.device.type))
            if self.capturing and key not in self.seen:
                self.unseen.append(key)
            self.seen.add(key)

    def __enter__(self):
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False


class GraphStandIn:
    """What :func:`emulated_graphs` installs as ``gfnet.engine.GRAPHS``: makes one :class:`EmulatedGraphs` per plan
    and counts what they did (``captures``, ``replays``, ``failures``: the reasons of refused captures)."""

    def __init__(self, first_sight: Optional[_FirstSight], fail: Optional[Callable[[int], bool]]):
        self.first_sight = first_sight
        self.fail = fail
        self.captures = 0
        self.replays = 0
        self.failures: list = []
        self.machines: list = []

    @staticmethod
    def available(device: torch.device) -> bool:
        return True

    def __call__(self, device: torch.device) -> EmulatedGraphs:
        machine = EmulatedGraphs(device, self)
        self.machines.append(machine)
        return machine


class EmulatedGraphs:
    """The CPU stand-in of one plan's CUDA-graph machinery (the interface of ``gfnet.engine._CudaGraphs``).

    ``capture(fn, writes)`` runs ``fn`` once (what a real capture records), puts back the tensors ``fn`` writes
    (a recording changes nothing) and returns ``fn``'s output with a replay that runs ``fn`` again into that output
    (what replaying the recorded kernels does: the same computation, reading and writing the same tensors). It
    refuses a capture, as a real one fails:
    - when something compiles during it (torch.compile recompiling because its guards differ between the eager
      runs and the capture, e.g. on the autocast state);
    - with ``first_sight``: when a convolution meets a shape no earlier run met (cuDNN's benchmark mode);
    - when ``fail(n)`` says so for the n-th capture of the stand-in (0-based): forced failures.
    """

    def __init__(self, device: torch.device, owner: GraphStandIn):
        self.device = device
        self.owner = owner
        self.stream = None

    def warm(self, fn):
        return fn()

    def capture(self, fn, writes=()):
        owner = self.owner
        number = owner.captures
        owner.captures += 1
        if owner.fail is not None and owner.fail(number):
            owner.failures.append(f"capture {number}: forced failure")
            raise RuntimeError(f"emulated capture {number}: forced failure")
        from torch._dynamo.utils import counters

        saved = [w.clone() for w in writes]
        compiled = counters["stats"]["unique_graphs"]
        sight = owner.first_sight
        if sight is not None:
            sight.capturing, sight.unseen = True, []
        try:
            out = fn()
        finally:
            if sight is not None:
                sight.capturing = False
            for w, s in zip(writes, saved):
                w.copy_(s)
        reason = None
        if counters["stats"]["unique_graphs"] != compiled:
            reason = "torch.compile compiled during the capture (a recompilation: its guards saw another state)"
        elif sight is not None and sight.unseen:
            reason = (f"{len(sight.unseen)} convolution(s) met a shape first in the capture (cuDNN's benchmark "
                      "mode would time algorithms inside it)")
        if reason is not None:
            owner.failures.append(f"capture {number}: {reason}")
            raise RuntimeError(f"emulated capture {number}: {reason}")

        # a graph replays its kernels as recorded: the autocast casts of the capture included
        kind = self.device.type
        recorded = dict(device_type=kind, enabled=torch.is_autocast_enabled(kind),
                        dtype=torch.get_autocast_dtype(kind), cache_enabled=torch.is_autocast_cache_enabled())

        def replay():
            owner.replays += 1
            with torch.no_grad(), torch.autocast(**recorded):
                out.copy_(fn())
        return out, replay


@contextlib.contextmanager
def emulated_graphs(first_sight: bool = True, fail: Optional[Callable[[int], bool]] = None) -> Iterator[GraphStandIn]:
    """Within the block, new budgeted-inference plans use :class:`EmulatedGraphs` (CUDA graphs allowed on the CPU,
    ``cuda_graphs`` on by default); yields the :class:`GraphStandIn` with its counts. ``first_sight``: refuse
    captures that meet a convolution shape first (tracks every convolution in the block); ``fail``: forced
    failures by capture number. Plans made inside are not reused outside (their key names the machinery)."""
    from gfnet import engine

    sight = _FirstSight() if first_sight else None
    stand_in = GraphStandIn(sight, fail)
    previous = engine.GRAPHS
    engine.GRAPHS = stand_in
    try:
        if sight is not None:
            with sight:
                yield stand_in
        else:
            yield stand_in
    finally:
        engine.GRAPHS = previous


@contextlib.contextmanager
def fake_gpus(count: int, capability=(9, 0), name: str = "stand-in GPU") -> Iterator[None]:
    """Within the block, ``torch.cuda`` reports ``count`` available GPUs of compute capability ``capability``
    (nothing runs on them: for the code that decides by the count or the capability)."""
    patched = {"is_available": lambda: count > 0, "device_count": lambda: count,
               "get_device_capability": lambda device=None: tuple(capability),
               "get_device_name": lambda device=None: name}
    saved = {k: getattr(torch.cuda, k) for k in patched}
    try:
        for k, v in patched.items():
            setattr(torch.cuda, k, v)
        yield
    finally:
        for k, v in saved.items():
            setattr(torch.cuda, k, v)
