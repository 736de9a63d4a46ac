"""The slow reference the engine is judged by: greedy decoding with a full, uncached forward per new token."""

from __future__ import annotations

import torch

from falconlm import FalconForCausalLM


def uncached_greedy(model: FalconForCausalLM, prompt: list[int], steps: int) -> list[int]:
    """The ``steps`` greedy tokens after ``prompt``, each from a forward over the whole sequence so far."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]
