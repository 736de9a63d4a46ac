"""The engine's kernel choices, made in two places only: per weight when the runner takes a model (which
matmul each bfloat16 weight uses), and per step (the fused decode step or the model's torch forward, see
``runner.py``). Quantized weights chose their kernel when they were loaded (``falconlm.quant.kernels``).
"""

from __future__ import annotations

import logging

import torch

from .. import native
from ..model.falcon import FalconForCausalLM, FalconLinear
from ..model.paged_attention import RowAttention
from ..native import ops

log = logging.getLogger("falconlm.engine")


def bind_weight_kernels(model: FalconForCausalLM, invariant: bool = False) -> int:
    """Give every bfloat16 CPU ``FalconLinear`` of ``model`` the native matmul (built now, not in the first
    request), the batch-invariant one for every row count when ``invariant``; returns how many weights took it.
    Without the native kernels nothing changes."""
    if native.kernels() is None:
        return 0
    bound = 0
    for module in model.modules():
        if isinstance(module, FalconLinear) and module.weight.dtype is torch.bfloat16 and module.weight.is_cpu:
            module.matmul = ops.linear_invariant if invariant else ops.linear
            bound += 1
    return bound


def row_attention(device: torch.device) -> RowAttention | None:
    """The kernel for one-query-per-row attention over the paged cache on ``device``, or None for SDPA."""
    return ops.decode_attention if device.type == "cpu" and native.kernels() is not None else None


def log_choice() -> None:
    """One log line: which native variant runs, and why the others do not."""
    log.info("%s", native.describe())
