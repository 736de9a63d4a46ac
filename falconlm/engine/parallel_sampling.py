"""n > 1 as one parent request with ``n`` child sequences, the engine's one fan-out for LLM, server and batch.

Child ``i`` of parent ``id`` is sequence ``id-i`` (a parent with n = 1 is its own only sequence, ``id``) and
samples with seed ``seed + i``, wrapped into the signed 64-bit range (torch reads a seed modulo 2**64, so the
wrap changes no stream), so seeded children differ from each other and repeat across calls.

The children share the prompt's KV blocks through the prefix cache: each full block of the prompt, once one
child has computed it, is reused by every child admitted after (a child admitted in the same step as the
first computes it itself). A child asking for prompt logprobs computes its whole prompt (see ``Request``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .sampling_params import SamplingParams


def child_seed(seed: int, child: int) -> int:
    """The seed of child ``child``: ``seed + child``, wrapped into [-2**63, 2**63 - 1]."""
    return (seed + child + 2**63) % 2**64 - 2**63


def sequence_ids(request_id: str, n: int) -> list[str]:
    """The ids of a request's sequences: itself when n = 1, else ``request_id-i`` for each child."""
    return [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]


@dataclass(frozen=True)
class ChildSequence:
    """One sequence of a parent request: its id, its index among the parent's outputs and its own params."""

    request_id: str
    index: int
    params: SamplingParams


def child_sequences(request_id: str, params: SamplingParams) -> list[ChildSequence]:
    """The ``params.n`` sequences of a parent request, each with n = 1 and its own seed."""
    if params.n == 1:
        return [ChildSequence(request_id, 0, params)]
    children = []
    for index, child_id in enumerate(sequence_ids(request_id, params.n)):
        seed = None if params.seed is None else child_seed(params.seed, index)
        children.append(ChildSequence(child_id, index, replace(params, n=1, seed=seed)))
    return children
