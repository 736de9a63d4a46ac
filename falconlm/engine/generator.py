"""Static-batch generation: left-padded prefill, then one decode step per token over a contiguous KV cache.

This is the simple path used by the offline API and the CLI: a fixed set of rows starts together and the loop
ends when every row has finished. Each step is: forward (last position only) -> Sampler -> per-row bookkeeping
(stop checks, incremental detokenization) -> a list of :class:`StreamEvent` for whoever streams the text.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..model.falcon import FalconForCausalLM
from ..tokenizer import Tokenizer
from .detokenizer import IncrementalDetokenizer, StopMatcher
from .outputs import CompletionOutput
from .sampler import Sampler, make_generator
from .sampling_params import SamplingParams


@dataclass
class StreamEvent:
    """New text for one row after a step; ``finished`` is set on the row's last event."""

    row: int
    text: str
    token_id: int | None
    finished: bool


@dataclass
class _Row:
    prompt_ids: list[int]
    params: SamplingParams
    max_new: int
    detok: IncrementalDetokenizer
    stop: StopMatcher
    generator: torch.Generator | None
    output: CompletionOutput
    eos_ids: frozenset[int] = field(default_factory=frozenset)

    def accept(self, token_id: int, logprobs: object | None) -> str:
        """Record one sampled token; return the text it releases, setting finish_reason when the row ends."""
        out = self.output
        out.token_ids.append(token_id)
        if logprobs is not None:
            out.logprobs = [*(out.logprobs or []), logprobs]
        reason = None
        if token_id in self.eos_ids or token_id in self.params.stop_token_ids:
            if token_id not in self.eos_ids:
                out.stop_reason = token_id
            text, reason = self._flush(), "stop"
        else:
            text, stopped = self.stop.feed(self.detok.add(token_id))
            if stopped:
                reason = "stop"
            elif len(out.token_ids) >= self.max_new:
                text += self._flush()
                reason = "stop" if self.stop.stopped else "length"
        if self.stop.stopped:
            out.stop_reason = "stop_string"
        out.text += text
        out.finish_reason = reason
        return text

    def _flush(self) -> str:
        """The text still held back by the detokenizer and the stop matcher, at the end of the row."""
        text, stopped = self.stop.feed(self.detok.finish())
        return text if stopped else text + self.stop.flush()


def generate_stream(
    model: FalconForCausalLM,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    params: Sequence[SamplingParams],
    max_model_len: int,
    sampler: Sampler | None = None,
) -> tuple[list[CompletionOutput], Iterator[list[StreamEvent]]]:
    """Validate the batch now; return the outputs (filled as you iterate) and an iterator of step events.

    Raises ValueError when a prompt is empty or leaves no room in ``max_model_len``.
    """
    if len(prompts) != len(params):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
    rows = [
        _make_row(tokenizer, list(p), sp, max_model_len, i)
        for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
    ]
    return [r.output for r in rows], _run(model, rows, sampler or Sampler())


def generate(
    model: FalconForCausalLM,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    params: Sequence[SamplingParams],
    max_model_len: int,
) -> list[CompletionOutput]:
    """Run a batch to the end and return one CompletionOutput per prompt."""
    outputs, steps = generate_stream(model, tokenizer, prompts, params, max_model_len)
    for _ in steps:
        pass
    return outputs


def _make_row(tokenizer: Tokenizer, prompt: list[int], sp: SamplingParams, max_model_len: int, index: int) -> _Row:
    if not prompt:
        raise ValueError("prompt is empty: give at least one token")
    room = max_model_len - len(prompt)
    if room < 1:
        raise ValueError(f"prompt has {len(prompt)} tokens, the model's context is {max_model_len}")
    max_new = room if sp.max_tokens is None else min(sp.max_tokens, room)
    eos = frozenset() if sp.ignore_eos or tokenizer.eos_token_id is None else frozenset({tokenizer.eos_token_id})
    return _Row(
        prompt_ids=prompt,
        params=sp,
        max_new=max_new,
        detok=IncrementalDetokenizer(tokenizer, skip_special_tokens=sp.skip_special_tokens),
        stop=StopMatcher(sp.stop or []),
        generator=make_generator(sp.seed),
        output=CompletionOutput(index=index),
        eos_ids=eos,
    )


@torch.inference_mode()
def _run(model: FalconForCausalLM, rows: list[_Row], sampler: Sampler) -> Iterator[list[StreamEvent]]:
    device = model.lm_head.weight.device
    B = len(rows)
    lengths = [len(r.prompt_ids) for r in rows]
    P = max(lengths)
    total = P + max(r.max_new for r in rows)
    padded = any(n != P for n in lengths)
    ids = torch.zeros(B, P, dtype=torch.long)
    key_mask = torch.zeros(B, total, dtype=torch.long)
    for i, r in enumerate(rows):  # left padding, so every row's last prompt token sits at P - 1
        ids[i, P - lengths[i] :] = torch.tensor(r.prompt_ids)
        key_mask[i, P - lengths[i] :] = 1
    ids, key_mask = ids.to(device), key_mask.to(device)
    cache = model.new_kv_cache(B, total)
    logits = model(ids, key_mask[:, :P] if padded else None, kv_cache=cache, last_token_only=True)
    active = list(range(B))
    while active:
        out = sampler(
            logits[active, -1].float(),
            [rows[i].params for i in active],
            [rows[i].prompt_ids for i in active],
            [rows[i].output.token_ids for i in active],
            [rows[i].generator for i in active],
        )
        events = []
        for j, i in enumerate(active):
            text = rows[i].accept(out.token_ids[j], out.logprobs[j])
            events.append(StreamEvent(i, text, out.token_ids[j], rows[i].output.finished))
        yield events
        active = [i for i in active if not rows[i].output.finished]
        if not active:
            return
        next_ids = torch.tensor([[r.output.token_ids[-1]] for r in rows], device=device)  # [B, 1]
        key_mask[:, cache.length] = 1
        mask = key_mask[:, : cache.length + 1] if padded else None
        logits = model(next_ids, mask, kv_cache=cache, last_token_only=True)
