"""Helpers shared by the fused-step tests: a model in the weights under test, and the rows of its fused native
calls."""

from __future__ import annotations

from pathlib import Path

import torch

from falconlm.engine.fused_decode import fused_decoder
from falconlm.model.falcon import FalconForCausalLM
from falconlm.quant import load_quantized


def model_in(checkpoint: Path, weights: str, dtype: torch.dtype = torch.bfloat16) -> FalconForCausalLM:
    """``checkpoint`` with bf16 weights, or quantized to int8 / int4 (g64 where the width allows), in ``dtype``."""
    if weights == "bf16":
        return FalconForCausalLM.from_pretrained(checkpoint, dtype=dtype)
    return load_quantized(checkpoint, quantize=weights, dtype=dtype)


def counting(model: FalconForCausalLM, entry: str = "_fn") -> list[int]:
    """Rows of each call of the model's decoder's ``entry`` (``_fn``: decode steps, ``_prompt_fn``: prompt
    chunks) from now on."""
    decoder = fused_decoder(model.decoder)
    calls: list[int] = []
    native = getattr(decoder, entry)

    def counted(*args):
        calls.append(args[4])
        return native(*args)

    setattr(decoder, entry, counted)
    return calls
