"""Tensor parallelism over ``torch.distributed``: process groups, head/row partitions, parallel layers and
per-rank shard loading.

One process per rank, launched by ``torchrun`` (gloo on CPUs, NCCL on GPUs). Each rank builds its family's own
model classes from a per-rank config (its share of the heads and the MLP), with the linear layers that cross ranks
swapped for the column- and row-parallel ones in ``layers.py``, and fills them with only its slices of the
checkpoint (``loading.py``), so no rank ever holds the whole model. The engine's rank 0 schedules and broadcasts
each step; the other ranks follow (``falconlm.engine.tp_runner``).
"""

from .loading import load_sharded
from .partition import Partition, partition
from .state import ParallelState, init_parallel, single_process

__all__ = ["ParallelState", "Partition", "init_parallel", "load_sharded", "partition", "single_process"]
