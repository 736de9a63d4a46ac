"""Where this process stands in a tensor-parallel group: rank, world size, device, and collectives with timeouts.

Every collective goes through :class:`ParallelState`, so a rank that died makes the others fail with an error after
``timeout`` instead of hanging (the process group is created with that timeout; gloo enforces it on every
collective, NCCL through its watchdog).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ParallelState:
    """One rank of a tensor-parallel group (``group`` None is the default group; world size 1: no group)."""

    rank: int
    world_size: int
    device: torch.device
    timeout_s: float = DEFAULT_TIMEOUT_S
    group: dist.ProcessGroup | None = None

    @property
    def is_driver(self) -> bool:
        """Rank 0 runs the scheduler (and HTTP); the others follow its steps."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``x`` over ranks, in place (a row-parallel layer's partial products)."""
        if self.distributed:
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate every rank's ``x`` along the last dim; rank r's part has ``sizes[r]`` columns there
        (uneven shares allowed)."""
        if not self.distributed:
            return x
        # Collectives move equal sizes (gloo insists): pad every part to the widest, then trim.
        widest = max(sizes)
        padded = x if x.shape[-1] == widest else torch.nn.functional.pad(x, (0, widest - x.shape[-1]))
        parts = [x.new_empty((*x.shape[:-1], widest)) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat([p[..., :n] for p, n in zip(parts, sizes, strict=True)], dim=-1)


def exit_rank(code: int) -> NoReturn:
    """End a process that ran in a gloo / NCCL group: flush its output, then ``os._exit(code)``.

    Skipping the interpreter's finalization is the point: gloo's worker threads can still hold finished work
    then, and freeing it during finalization aborts the process (SIGABRT, "terminate called without an active
    exception") after a run that succeeded."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def single_process(device: str | torch.device = "cpu") -> ParallelState:
    """World size 1: every collective is the identity."""
    return ParallelState(0, 1, torch.device(device))


def init_parallel(
    tensor_parallel_size: int, device: str | torch.device | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> ParallelState:
    """Join the process group ``torchrun`` set up (RANK, WORLD_SIZE, MASTER_ADDR... in the environment).

    gloo on CPU, NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``). ValueError (one line) when the world torchrun
    started is not ``tensor_parallel_size`` processes.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tensor_parallel_size == 1 and world == 1:
        return single_process(device or "cpu")
    if world != tensor_parallel_size:
        raise ValueError(
            f"--tensor-parallel-size {tensor_parallel_size} needs that many processes: launch with "
            f"torchrun --nproc-per-node {tensor_parallel_size} (this world has {world})"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return ParallelState(dist.get_rank(), dist.get_world_size(), dev, timeout_s)
