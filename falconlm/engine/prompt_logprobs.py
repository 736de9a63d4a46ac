"""Prompt logprobs inside the engine step: which rows of a forward pass score prompt tokens, and their scores.

The logits at position ``p`` predict token ``p + 1``, so a row computing positions ``[start, start + n)`` scores
the prompt tokens at ``start + 1 .. min(start + n, num_prompt_tokens - 1)``; the last prompt position predicts
the first generated token and is the sampled row. Values come from the raw logits (log_softmax in float32), as
the sampler's logprobs do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .sampler import TokenLogprobs
from .scheduler_output import ScheduledRequest


@dataclass
class PromptRows:
    """The rows of one forward pass that score part of one request's prompt."""

    request_id: str
    first_position: int  # the prompt position whose token the first row scores
    flat_indices: list[int]  # rows of the flattened step
    target_ids: list[int]  # the prompt token each row scores
    num_top: int


def prompt_rows(items: Sequence[ScheduledRequest], query_starts: Sequence[int]) -> list[PromptRows]:
    """For each item that asks for prompt logprobs and computes prompt positions, the rows that score them."""
    rows = []
    for item, query_start in zip(items, query_starts, strict=True):
        request = item.request
        num_top = getattr(request.sampling_params, "prompt_logprobs", None)
        end = min(item.start + item.num_tokens, request.num_prompt_tokens - 1)
        if num_top is None or end <= item.start:
            continue
        positions = range(item.start, end)
        rows.append(
            PromptRows(
                request.request_id,
                item.start + 1,
                [query_start + p - item.start for p in positions],
                [request.prompt_token_ids[p + 1] for p in positions],
                num_top,
            )
        )
    return rows


def score_prompt_rows(logits: torch.Tensor, rows: Sequence[PromptRows]) -> dict[str, tuple[int, list[TokenLogprobs]]]:
    """``logits`` holds each PromptRows' rows back to back; returns request id -> (first position, logprobs)."""
    out: dict[str, tuple[int, list[TokenLogprobs]]] = {}
    offset = 0
    for part in rows:
        count = len(part.flat_indices)
        logprobs = torch.log_softmax(logits[offset : offset + count].float(), dim=-1)
        offset += count
        targets = torch.tensor(part.target_ids, device=logprobs.device)
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        top_values, top_ids = logprobs.topk(part.num_top, dim=-1)
        top_values, top_ids = top_values.tolist(), top_ids.long().tolist()
        entries = [
            TokenLogprobs(token_id, chosen[i], list(zip(top_ids[i], top_values[i], strict=True)))
            for i, token_id in enumerate(part.target_ids)
        ]
        out[part.request_id] = (part.first_position, entries)
    return out
