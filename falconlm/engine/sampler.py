"""Turn a batch of next-token logits into token ids, one row per request.

Logit transforms, in the order applied (each is skipped when no row uses it):

1. ``logit_bias``: add the request's bias to the named tokens.
2. Repetition penalty (HF/vLLM rule) over prompt and generated tokens: a seen
   token's logit is divided by the penalty when positive, multiplied when negative.
3. Presence and frequency penalties (OpenAI rule) over generated tokens only:
   ``logit -= presence * (count > 0) + frequency * count``.
4. Grammar mask (structured output): tokens the row's grammar forbids become ``-inf``
   (the bitmask comes from each request's grammar state, ``structured_output.py``).
5. Greedy rows (temperature 0 or top_k 1) take the argmax here and stop.
6. Temperature: divide by ``temperature``.
7. ``min_p``: drop tokens whose probability is below ``min_p`` times the top probability.
8. ``top_k``: keep exactly the ``k`` highest tokens (which of tied tokens at the edge survive is unspecified).
9. ``top_p``: keep the smallest highest-first set whose cumulative probability
   reaches ``top_p``; the top token is always kept.
10. Draw from the softmax with the row's generator (exponential race).

Logprobs come from the raw logits (log_softmax before any transform), as in vLLM. The grammar mask is a transform
too: a constrained token's logprob is the model's own, and the top-N may list tokens the grammar forbade.
Every transform works on each row alone, so a row's tokens never depend on the other rows of the batch.
All work is in float32 on the logits' device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from falconlm.engine.sampling_params import SamplingParams
from falconlm.native.ops import argmax

_NEG_INF = float("-inf")
_TINY = torch.finfo(torch.float32).tiny


@dataclass
class TokenLogprobs:
    """Logprobs for one sampled position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # top-N (token_id, logprob), highest first; N = params.logprobs


@dataclass
class SamplerOutput:
    """The sampled token of each row, and its logprobs where the row asked."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded with ``seed`` on ``device``, or ``None`` when there is no seed."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _row_tensor(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """A float32 column ``[len(values), 1]`` of per-row settings."""
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _token_counts(id_lists: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """``[len(id_lists), vocab]`` float32 counts of each token id per row."""
    width = max((len(ids) for ids in id_lists), default=0)
    counts = torch.zeros(len(id_lists), vocab, dtype=torch.float32, device=device)
    if width == 0:
        return counts
    index = torch.zeros(len(id_lists), width, dtype=torch.long)
    weight = torch.zeros(len(id_lists), width, dtype=torch.float32)
    for row, ids in enumerate(id_lists):
        if len(ids):
            index[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            weight[row, : len(ids)] = 1.0
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= vocab):
        raise ValueError(f"token ids must be in [0, {vocab}) for the penalties")
    return counts.scatter_add_(1, index.to(device), weight.to(device))


def _replace_rows(x: torch.Tensor, rows: list[int], new: torch.Tensor) -> torch.Tensor:
    """``x`` with ``rows`` replaced by ``new`` (out of place)."""
    if len(rows) == x.shape[0]:
        return new
    return x.index_copy(0, torch.tensor(rows, device=x.device), new)


def _take_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    if len(rows) == x.shape[0]:
        return x
    return x.index_select(0, torch.tensor(rows, device=x.device))


def _apply_penalties(
    x: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Steps 1-3 on float32 logits ``x`` ``[R, V]``; never modifies ``x`` in place."""
    vocab, device = x.shape[1], x.device

    rows, cols, bias = [], [], []
    for row, p in enumerate(params):
        for token, amount in (p.logit_bias or {}).items():
            rows.append(row)
            cols.append(token)
            bias.append(amount)
    if rows:
        if max(cols) >= vocab:
            raise ValueError(f"logit_bias token id {max(cols)} is out of range for vocab size {vocab}")
        index = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
        x = x.index_put(index, torch.tensor(bias, dtype=torch.float32, device=device), accumulate=True)

    rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rep_rows:
        seen = _token_counts([[*prompt_ids[i], *output_ids[i]] for i in rep_rows], vocab, device) > 0
        penalty = _row_tensor([params[i].repetition_penalty for i in rep_rows], device)
        sub = _take_rows(x, rep_rows)
        sub = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
        x = _replace_rows(x, rep_rows, sub)

    pf_rows = [i for i, p in enumerate(params) if p.presence_penalty != 0 or p.frequency_penalty != 0]
    if pf_rows:
        counts = _token_counts([output_ids[i] for i in pf_rows], vocab, device)
        presence = _row_tensor([params[i].presence_penalty for i in pf_rows], device)
        frequency = _row_tensor([params[i].frequency_penalty for i in pf_rows], device)
        sub = _take_rows(x, pf_rows) - (presence * (counts > 0) + frequency * counts)
        x = _replace_rows(x, pf_rows, sub)
    return x


def _shape_distribution(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Steps 6-9 on non-greedy rows ``x``; dropped tokens become ``-inf``."""
    vocab, device = x.shape[1], x.device

    if any(p.temperature != 1.0 for p in params):
        x = x / _row_tensor([p.temperature for p in params], device)

    if any(p.min_p > 0 for p in params):
        probs = torch.softmax(x, dim=-1)
        floor = probs.amax(dim=-1, keepdim=True) * _row_tensor([p.min_p for p in params], device)
        x = x.masked_fill(probs < floor, _NEG_INF)

    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    use_top_k = min(ks) < vocab
    use_top_p = any(p.top_p < 1.0 for p in params)
    if not (use_top_k or use_top_p):
        return x
    width = max(ks)
    if width < vocab:  # every row has a top_k, so only the best `width` tokens can survive
        ordered, order = torch.topk(x, width, dim=-1, sorted=True)
    else:
        ordered, order = torch.sort(x, dim=-1, descending=True, stable=True)
    if use_top_k:
        rank = torch.arange(width, device=device, dtype=torch.float32)
        ordered = ordered.masked_fill(rank >= _row_tensor(ks, device), _NEG_INF)
    if use_top_p:
        top_p = _row_tensor([p.top_p for p in params], device)
        probs = torch.softmax(ordered, dim=-1)
        above = probs.cumsum(dim=-1) - probs  # probability mass ranked above each token
        ordered = ordered.masked_fill((above >= top_p) & (top_p < 1.0), _NEG_INF)
    return torch.full_like(x, _NEG_INF).scatter_(1, order, ordered)


def _apply_grammar_mask(x: torch.Tensor, bitmask: torch.Tensor | None) -> torch.Tensor:
    """Step 4: ``-inf`` where bit ``t % 32`` of word ``t // 32`` of the row's int32 ``bitmask`` is 0."""
    if bitmask is None:
        return x
    if bitmask.shape[0] != x.shape[0] or bitmask.shape[1] * 32 < x.shape[1]:
        raise ValueError(f"a grammar bitmask of shape {tuple(bitmask.shape)} does not cover logits {tuple(x.shape)}")
    bits = torch.arange(32, dtype=torch.int32, device=x.device)
    allowed = ((bitmask.to(x.device).unsqueeze(-1) >> bits) & 1).bool().flatten(1)[:, : x.shape[1]]  # [R, V]
    return x.masked_fill(~allowed, _NEG_INF)


def _split_rows(params: Sequence[SamplingParams]) -> tuple[list[int], list[int]]:
    greedy = [i for i, p in enumerate(params) if p.greedy]
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    return greedy, sampled


def _check_batch(logits: torch.Tensor, *per_row: Sequence[object]) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [rows, vocab], got shape {tuple(logits.shape)}")
    for seq in per_row:
        if len(seq) != logits.shape[0]:
            raise ValueError(f"expected {logits.shape[0]} per-row entries, got {len(seq)}")


def apply_transforms(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    grammar_bitmask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The float32 logits the sampler draws from, without drawing.

    Greedy rows get steps 1-4 (their argmax is the greedy token); other rows
    get steps 1-4 and 6-9, with dropped tokens at ``-inf``. ``logits`` is left unchanged.
    """
    _check_batch(logits, params, prompt_ids, output_ids)
    x = _apply_penalties(logits.float(), params, prompt_ids, output_ids)
    x = _apply_grammar_mask(x, grammar_bitmask)
    _, sampled = _split_rows(params)
    if sampled:
        shaped = _shape_distribution(_take_rows(x, sampled), [params[i] for i in sampled])
        x = _replace_rows(x, sampled, shaped)
    return x


def _draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row of ``probs`` by the exponential race, each row with its own generator."""
    noise = torch.empty_like(probs)
    unseeded = [j for j, g in enumerate(generators) if g is None]
    if len(unseeded) == len(generators):
        noise.exponential_()
    elif unseeded:
        index = torch.tensor(unseeded, device=probs.device)
        noise[index] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_()
    for j, gen in enumerate(generators):
        if gen is not None:
            row = torch.empty(probs.shape[1], dtype=torch.float32, device=gen.device)
            noise[j] = row.exponential_(generator=gen).to(probs.device)
    return argmax(probs / noise.clamp_min_(_TINY))


def _logprobs(
    logits: torch.Tensor, token_ids: list[int], params: Sequence[SamplingParams]
) -> list[TokenLogprobs | None]:
    """Raw-logit logprobs of the chosen token and the top-N, for rows that asked."""
    out: list[TokenLogprobs | None] = [None] * len(params)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return out
    logp = torch.log_softmax(_take_rows(logits, rows).float(), dim=-1)
    chosen_index = torch.tensor([[token_ids[i]] for i in rows], device=logp.device)
    chosen = logp.gather(1, chosen_index).squeeze(1).tolist()
    width = min(max(params[i].logprobs or 0 for i in rows), logp.shape[1])
    top_vals: list[list[float]] = [[] for _ in rows]
    top_ids: list[list[int]] = [[] for _ in rows]
    if width > 0:
        values, indices = torch.topk(logp, width, dim=-1)
        top_vals, top_ids = values.tolist(), indices.tolist()
    for j, i in enumerate(rows):
        n = params[i].logprobs or 0
        top = list(zip(top_ids[j][:n], top_vals[j][:n], strict=True))
        out[i] = TokenLogprobs(token_id=token_ids[i], logprob=chosen[j], top=top)
    return out


class Sampler:
    """Stateless batch sampler; see the module docstring for the transform order."""

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None],
        grammar_bitmask: torch.Tensor | None = None,
    ) -> SamplerOutput:
        """Sample one token per row of ``logits`` ``[R, V]``; ``grammar_bitmask`` (int32 ``[R, ceil(V / 32)]``,
        see ``structured_output.grammar_bitmask``) limits constrained rows to their grammar's tokens."""
        _check_batch(logits, params, prompt_ids, output_ids, generators)
        x = _apply_penalties(logits.float(), params, prompt_ids, output_ids)
        x = _apply_grammar_mask(x, grammar_bitmask)
        greedy, sampled = _split_rows(params)
        if not sampled:
            token_ids = argmax(x)
        else:
            token_ids = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
            if greedy:
                index = torch.tensor(greedy, device=x.device)
                token_ids[index] = argmax(x.index_select(0, index))
            shaped = _shape_distribution(_take_rows(x, sampled), [params[i] for i in sampled])
            drawn = _draw(torch.softmax(shaped, dim=-1), [generators[i] for i in sampled])
            if greedy:
                token_ids[torch.tensor(sampled, device=x.device)] = drawn
            else:
                token_ids = drawn
        ids = token_ids.tolist()
        return SamplerOutput(token_ids=ids, logprobs=_logprobs(logits, ids, params))
