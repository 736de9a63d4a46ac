"""One engine-style step over a paged KV cache, built by hand: shared by the forward and tensor-parallel tests."""

from __future__ import annotations

import torch

from falconlm.model.paged_attention import PagedAttention, PagedKVCache
from falconlm.model.positions import head_alibi_slopes


def paged_step(
    model: torch.nn.Module,
    cache: PagedKVCache,
    tables: list[list[int]],
    tokens: list[list[int]],
    starts: list[int],
) -> torch.Tensor:
    """Row r adds ``tokens[r]`` at positions from ``starts[r]`` through its blocks ``tables[r]``, all rows
    flattened into one sequence (ALiBi slopes from the model's config); the logits of each row's last token."""
    cfg, bs = model.config, cache.k.shape[2]
    slopes = head_alibi_slopes(cfg) if cfg.alibi else None
    ids, positions, slots, query_starts, last = [], [], [], [], []
    for toks, start, table in zip(tokens, starts, tables, strict=True):
        query_starts.append(len(ids))
        ids += toks
        positions += range(start, start + len(toks))
        slots += [table[p // bs] * bs + p % bs for p in range(start, start + len(toks))]
        last.append(len(ids) - 1)
    ctx = PagedAttention(
        cache, torch.tensor(slots), query_starts, [len(t) for t in tokens],
        [s + len(t) for s, t in zip(starts, tokens, strict=True)], torch.tensor(tables), slopes,
    )  # fmt: skip
    hidden = model.forward_hidden(torch.tensor([ids]), torch.tensor([positions]), ctx)
    return model.compute_logits(hidden, torch.tensor(last))
