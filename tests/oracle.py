"""The slow reference the engine is judged by: greedy decoding with a full, uncached forward per new token; and
the comparison of bfloat16 greedy tokens with transformers', which near-ties allow to part."""

from __future__ import annotations

from collections.abc import Callable

import torch

from falconlm import FalconForCausalLM


def uncached_greedy(model: FalconForCausalLM, prompt: list[int], steps: int) -> list[int]:
    """The ``steps`` greedy tokens after ``prompt``, each from a forward over the whole sequence so far."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def assert_greedy_agrees(
    got: list[int],
    want: list[int],
    prompt: list[int],
    ours: Callable[[torch.Tensor], torch.Tensor],
    reference: Callable[[torch.Tensor], torch.Tensor],
    top: int = 5,
) -> None:
    """``got`` (our greedy tokens after ``prompt``) equals ``want`` (the reference's), or where they first part
    each side's token is among the other side's ``top`` candidates there. In bfloat16 a near-tie rounds either
    way, and which way depends on the order of each matmul's sums, so on the CPU's instruction set: strict
    equality would test the machine. ``ours`` and ``reference`` map token ids [1, T] to logits [1, T, vocab]."""
    assert len(got) == len(want)
    first = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None)
    if first is None:
        return
    context = torch.tensor([prompt + got[:first]])
    with torch.no_grad():
        ours_top = set(ours(context)[0, -1].float().topk(top).indices.tolist())
        ref_top = set(reference(context)[0, -1].float().topk(top).indices.tolist())
    assert got[first] in ref_top and want[first] in ours_top, f"tokens part at {first}: {got} != {want}"
