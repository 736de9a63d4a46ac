"""Tensor parallelism in a Ray batch: one engine of ``--tensor-parallel-size N`` is N actors joined in one group.

The driver reserves a placement group of N bundles with STRICT_PACK (every rank on one node; one GPU per bundle
with ``--device cuda``), runs :func:`free_address` on bundle 0 for that node's IP and a free port, and starts
rank 0 (an ``EngineWorker``: it builds the engine, whose ``init_parallel`` joins the group and whose plan goes to
the followers) and ranks 1..N-1 (:class:`FollowerWorker`: load this rank's shard and repeat rank 0's forwards)
with that address. Each actor has its process to itself, so it sets the variables ``torchrun`` would set
(:func:`join_environment`) in its own environment.

A rank that dies breaks the group: rank 0's engine stops with ``fatal_error`` and its actor ends its process
(``EngineWorker``), so the driver sees an engine die and replaces all N actors together.
"""

from __future__ import annotations

import logging
import os
import socket

from ..engine.factory import EngineArgs
from ..engine.tp_follower import run_follower
from ..engine.tp_runner import TensorParallelError

logger = logging.getLogger(__name__)


def free_address() -> tuple[str, int]:
    """This node's IP (as Ray knows it) and a TCP port free on it now: where rank 0 will listen for the group."""
    import ray

    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def join_environment(address: tuple[str, int], rank: int, world_size: int) -> None:
    """Set what ``init_parallel`` reads, as ``torchrun`` would. LOCAL_RANK is 0: Ray shows an actor only its own
    GPU, as ``cuda:0``."""
    host, port = address
    os.environ.update(
        MASTER_ADDR=host, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0"
    )


class FollowerWorker:
    """A Ray actor's body: rank ``rank`` (> 0) of the engine in pool slot ``slot`` (made remote by the driver).

    :meth:`follow` blocks while rank 0 runs; the driver kills the actor with the rest of its group.
    """

    def __init__(self, engine_args: EngineArgs, slot: int = 0, generation: int = 0, rank: int = 1) -> None:
        self.engine_args, self.slot, self.generation, self.rank = engine_args, slot, generation, rank

    def follow(self, address: tuple[str, int]) -> int:
        """Join the group at ``address``, load this rank's shard and follow rank 0: the forwards it ran, or -1 when
        the group failed (rank 0 died or went silent past the group's timeout)."""
        join_environment(address, self.rank, self.engine_args.tensor_parallel_size)
        try:
            return run_follower(self.engine_args)
        except TensorParallelError as exc:
            logger.error("rank %d of Ray engine %d stopped: %s", self.rank, self.slot, exc)
            return -1
