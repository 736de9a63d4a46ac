"""Counting the rows of a model's fused native calls (shared by the fused-step tests)."""

from __future__ import annotations

from falconlm.engine.fused_decode import fused_decoder
from falconlm.model.falcon import FalconForCausalLM


def counting(model: FalconForCausalLM, entry: str = "_fn") -> list[int]:
    """Rows of each call of the model's decoder's ``entry`` (``_fn``: decode steps, ``_prompt_fn``: prompt
    chunks) from now on."""
    decoder = fused_decoder(model.transformer)
    calls: list[int] = []
    native = getattr(decoder, entry)

    def counted(*args):
        calls.append(args[4])
        return native(*args)

    setattr(decoder, entry, counted)
    return calls
