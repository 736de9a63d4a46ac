"""Tensor parallelism in the engine, the other ranks' side: load this rank's shard, then repeat rank 0's forwards.

A follower has no scheduler, requests, tokenizer or sampler. It builds the runner rank 0 announced in its plan
(same layout, same number of KV blocks and state slots, its own local KV heads), then loops: receive a forward,
rebuild its attention context over the local cache, run the model's ``forward_hidden`` and ``compute_logits``
(the sharded model's collectives meet rank 0's), and drop the logits. Stop ends the loop; a failed collective
(rank 0 died, or went silent past the group's timeout) raises :class:`TensorParallelError`.
"""

from __future__ import annotations

import logging

import torch

from ..parallel import ParallelState, init_parallel
from ..parallel.loading import load_sharded
from .devices import resolve_device, resolve_dtype
from .factory import EngineArgs
from .hybrid_runner import HybridRunner
from .recurrent_runner import RecurrentRunner
from .runner import ModelRunner
from .tp_runner import FORWARD, PLAN, STOP, RunnerPlan, StepChannel, TensorParallelError, runner_layout

logger = logging.getLogger(__name__)


def follower_runner(model, plan: RunnerPlan) -> ModelRunner:
    """The runner rank 0 described, over this rank's model (its own KV heads, rank 0's block and slot counts)."""
    layout = runner_layout(model)
    if layout != plan.layout:
        raise TensorParallelError(f"rank 0 runs a {plan.layout} model but this rank loaded a {layout} one")
    if layout == "recurrent":
        runner: ModelRunner = RecurrentRunner(model, plan.num_slots)
    elif layout == "hybrid":
        runner = HybridRunner(model, plan.num_blocks, plan.block_size, plan.num_slots, plan.deterministic)
    else:
        runner = ModelRunner(model, plan.num_blocks, plan.block_size, plan.deterministic)
    runner.fused_allowed = False
    return runner


def follow(model, state: ParallelState) -> int:
    """Repeat rank 0's forwards over ``model`` until it says stop; returns how many forwards ran."""
    channel = StepChannel(state)
    kind, plan = channel.receive()
    if kind == STOP:  # rank 0 ended without building an engine (nothing to run)
        return 0
    if kind != PLAN or not isinstance(plan, RunnerPlan):
        raise TensorParallelError(f"rank {state.rank} expected rank 0's plan first, got message kind {kind}")
    runner = follower_runner(model, plan)
    logger.info("rank %d follows rank 0: %s", state.rank, plan)
    forwards = 0
    while True:
        kind, batch = channel.receive()
        if kind == STOP:
            return forwards
        if kind == FORWARD:
            with torch.inference_mode():
                runner.run_batch(batch)
            forwards += 1


def run_follower(args: EngineArgs) -> int:
    """A rank > 0 of ``torchrun``: join the group, load this rank's shard, follow rank 0 until it stops."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    state = init_parallel(args.tensor_parallel_size, device, args.distributed_timeout_s)
    model = load_sharded(args.model_path, state, resolve_dtype(args.dtype, device), args.quantize)
    return follow(model.eval(), state)
