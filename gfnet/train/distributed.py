"""torch.distributed set-up for training and evaluation: one process per device, launched by torchrun
(or alone).

``torchrun --nproc-per-node K -m gfnet.cli.train ...`` (or ``-m gfnet.cli.eval``) sets RANK, WORLD_SIZE,
LOCAL_RANK and MASTER_ADDR/PORT, on one node or many (``--nnodes N --node-rank R --rdzv-endpoint
HOST:PORT``); :func:`init_distributed` reads them and opens the process group (NCCL for CUDA devices,
gloo for the CPU): it is the one place in gfnet that does. Without them the same code runs as a single
process. :meth:`DistributedContext.close` closes the group again.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from gfnet.device import resolve_device as _resolve_device

__all__ = ["DistributedContext", "init_distributed", "resolve_device"]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: rank among world_size processes, its device, the backend (or None)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over all processes (in place; returned for chaining)."""
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor

    def all_gather_object(self, obj):
        """list of every process's ``obj`` (rank order); [obj] on one process."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather_object(self, obj, dst: int = 0):
        """On rank ``dst``: the list of every process's ``obj`` (rank order); None on the others; [obj] on
        one process. Only ``dst`` holds all of them (evaluation gathers its outputs to rank 0 this way)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def broadcast_object(self, obj, src: int = 0):
        """Rank ``src``'s ``obj`` on every process (the others' argument is ignored)."""
        if not self.enabled:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def close(self) -> None:
        """Close the process group that :func:`init_distributed` opened (nothing on one process)."""
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(device=None, local_rank: int = 0) -> torch.device:
    """This process's device: ``device`` checked (see :func:`gfnet.device.resolve_device`), with a bare "cuda"
    (or None on a GPU machine) taking the process's GPU.

    The process's GPU is ``cuda:LOCAL_RANK`` when every process sees all GPUs, and ``cuda:0`` when each sees
    only its own (a per-rank CUDA_VISIBLE_DEVICES, as SLURM and some launchers set it): LOCAL_RANK is then no
    device index.
    """
    if device in (None, "auto"):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        device = "cuda"
    if torch.device(device).type == "cuda" and torch.device(device).index is None and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if count == 1:
            return torch.device("cuda", 0)
        if local_rank >= count:
            raise ValueError(f"LOCAL_RANK={local_rank} but this process sees only {count} GPU(s) "
                             f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): launch at most "
                             f"{count} processes per node, or give each process one GPU")
        return torch.device("cuda", local_rank)
    return _resolve_device(device)


def init_distributed(device=None) -> DistributedContext:
    """Open the process group when launched by torchrun (WORLD_SIZE > 1), else a single-process context.

    Args:
        device: "cpu", "cuda", "cuda:K" or None (CUDA when present). Under torchrun each process takes
            ``cuda:LOCAL_RANK``; the backend is NCCL on CUDA and gloo on the CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size <= 1:
        return DistributedContext(0, 1, 0, dev, None)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        # device_id binds the NCCL communicator to this process's GPU (not to whatever LOCAL_RANK would index)
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is not None and "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
            # torchrun restarts a failed job (--max-restarts) against the launcher's store, which still holds
            # the previous attempt's keys (each rank's gloo address, NCCL's unique id): a restarted rank can
            # read them before its peer rewrites them and dial a dead process (found with gloo: connection
            # refused, or a hang). Each attempt gets its own key space.
            store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size))
            kwargs["store"] = dist.PrefixStore(f"gfnet/attempt-{attempt}", store)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)
