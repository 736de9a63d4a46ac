"""Fully sharded data parallelism (FSDP2, ``torch.distributed.fsdp.fully_shard``) for ``falconlm train --fsdp``.

Each decoder block is one FSDP unit (its parameters are all-gathered just before its forward and backward and
freed after), the root unit holds the embedding, the final norm and the (tied) head. Parameters, gradients and
AdamW state live sharded across ranks, 1/world of each per rank. Checkpoints stay ordinary: the full weights and
the full optimizer state (keyed by parameter name) are gathered to rank 0's CPU and written like a single-process
run's, so ``falconlm generate`` loads them and a run may resume with or without ``--fsdp``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from ..model.falcon import FalconForCausalLM
from .optim import param_groups

# Optimizer state layouts in training_state.pt: torch's own (parameters by position) and the named one FSDP saves.
BY_INDEX, BY_NAME = "index", "name"
_FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_model(model: FalconForCausalLM, device: torch.device, world_size: int) -> FalconForCausalLM:
    """Shard ``model`` in place over all ranks: one FSDP unit per decoder block, then the root."""
    mesh = init_device_mesh(device.type, (world_size,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Skip (False) or do (True) the gradient reduce-scatter of the next backward, for gradient accumulation."""
    model.set_requires_gradient_sync(sync)  # type: ignore[operator]


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on rank 0's CPU (empty on the other ranks). Every rank must call it."""
    return get_model_state_dict(model, options=_FULL_ON_RANK0)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The unsharded optimizer state keyed by parameter name, on rank 0's CPU. Every rank must call it."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL_ON_RANK0)


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], layout: str
) -> None:
    """Load a full optimizer state (present on every rank) into ``optimizer``, sharded or not."""
    if layout == BY_INDEX:
        state = _named(model, state)
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _named(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """Torch's position-keyed optimizer state as the name-keyed one (positions follow :func:`param_groups`)."""
    names_of = {id(p): name for name, p in model.named_parameters()}
    order = [names_of[id(p)] for group in param_groups(model, 0.0) for p in group["params"]]
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {order[i]: s for i, s in state["state"].items()}, "param_groups": groups}


def plain_model(cls: type[FalconForCausalLM], config: Any, weights: dict[str, torch.Tensor]) -> FalconForCausalLM:
    """An unsharded ``cls`` (the model's class before sharding) around gathered ``weights`` (no copy), to be saved
    like any other."""
    with torch.device("meta"):
        model = cls(config)
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"the gathered weights do not fit the model: missing {missing}, unexpected {unexpected}")
    return model


def local_float(value: torch.Tensor) -> float:
    """A replicated (DTensor) or plain scalar tensor as a float."""
    if isinstance(value, DTensor):
        value = value.full_tensor()
    return float(value)
