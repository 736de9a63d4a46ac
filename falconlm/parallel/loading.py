"""Loading a checkpoint as one rank's shard (the entry point the engine factory calls)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..model.falcon import FalconForCausalLM
from .state import ParallelState


def load_sharded(
    path: str | Path,
    state: ParallelState,
    dtype: torch.dtype = torch.float32,
    quantize: str | None = None,
) -> nn.Module:
    """This rank's shard of the checkpoint at ``path``, in ``dtype`` on ``state.device``, in eval mode.

    The model answers the same calls as an unsharded one (``forward_hidden``, ``compute_logits``, ``config`` with
    this rank's head counts...), and its collectives run through ``state``: every rank must make the same calls
    in the same order. World size 1 is a plain load.

    TEMPORARY STAND-IN until the sharded loader lands: every rank loads the whole model (replicated, no
    collectives), so the step broadcast can be built and tested against it.
    """
    model = FalconForCausalLM.from_pretrained(path, dtype=dtype, device=state.device, quantize=quantize)
    return model.eval()
