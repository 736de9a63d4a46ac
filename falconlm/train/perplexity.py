"""Sliding-window perplexity, as Hugging Face describes it ("Perplexity of fixed-length models").

Windows of ``context`` tokens start every ``stride`` tokens; each window scores only the tokens that no
earlier window scored. With ``stride < context`` every token after the first is scored exactly once, with at
least ``context - stride`` tokens before it; with ``stride >= context`` each window's first token has nothing
before it and is not scored (as in Hugging Face's recipe).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..model.falcon import FalconForCausalLM


@dataclass(frozen=True)
class PerplexityResult:
    tokens: int  # tokens scored
    nll: float  # mean negative log-likelihood per scored token, in nats

    @property
    def ppl(self) -> float:
        return math.exp(self.nll) if self.nll < 700 else math.inf


@dataclass(frozen=True)
class Window:
    begin: int
    end: int
    first_scored: int  # the first position whose token this window scores


def windows(n: int, context: int, stride: int) -> list[Window]:
    """The windows over ``n`` tokens; the last one ends at ``n``."""
    if context < 2:
        raise ValueError(f"context must be at least 2, got {context}")
    if stride < 1:
        raise ValueError(f"stride must be positive, got {stride}")
    out: list[Window] = []
    scored_to = 1  # token 0 has nothing before it
    for begin in range(0, max(n - 1, 1), stride):
        end = min(begin + context, n)
        first = max(scored_to, begin + 1)
        if end > first:
            out.append(Window(begin, end, first))
            scored_to = end
        if end == n:
            break
    return out


@torch.no_grad()
def perplexity(
    model: FalconForCausalLM,
    token_ids: Sequence[int] | torch.Tensor,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
    progress: bool | None = None,
) -> PerplexityResult:
    """Perplexity of ``token_ids`` under ``model`` with windows of ``context`` (default: the model's maximum)
    every ``stride`` tokens (default: ``context // 2``)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if ids.numel() < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    context = context or model.config.max_position_embeddings
    if context > model.config.max_position_embeddings:
        raise ValueError(
            f"context {context} exceeds the model's max_position_embeddings ({model.config.max_position_embeddings})"
        )
    stride = stride or max(1, context // 2)
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    spans = windows(ids.numel(), context, stride)
    show = sys.stderr.isatty() if progress is None else progress
    total_nll, total_tokens = 0.0, 0
    with tqdm(total=ids.numel() - 1, desc="perplexity", unit=" tok", unit_scale=True, disable=not show) as bar:
        for group in _batches(spans, batch_size):
            inputs = torch.stack([ids[w.begin : w.end] for w in group]).to(device)
            logits = model(inputs).float()
            logprobs = F.log_softmax(logits[:, :-1], dim=-1)
            targets = inputs[:, 1:]
            nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [b, L-1], nll of tokens 1..L-1
            for row, w in enumerate(group):
                scored = nll[row, w.first_scored - w.begin - 1 :]
                total_nll += scored.double().sum().item()
                total_tokens += scored.numel()
                bar.update(scored.numel())
    model.train(was_training)
    return PerplexityResult(tokens=total_tokens, nll=total_nll / total_tokens)


def _batches(spans: list[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows of equal length, ``batch_size`` at a time."""
    groups: list[list[Window]] = []
    for w in spans:
        last = groups[-1] if groups else None
        if last and len(last) < batch_size and last[0].end - last[0].begin == w.end - w.begin:
            last.append(w)
        else:
            groups.append([w])
    return groups
