"""Embedding requests in the engine: a FIFO queue beside the scheduler's, run as prefill-only forwards that bypass
the paged KV cache.

An embedding request needs its input's final hidden states once and no token after them, so it holds no KV block
and writes nothing to the prefix cache: its forward attends within each input only
(:class:`PackedPrefillAttention`), and its keys and values are dropped when the forward ends.

Sharing a step with generation (``Engine.step`` calls :meth:`Embedder.step` after the scheduler's rows ran):
generation is scheduled first, with the whole token budget (``max_num_batched_tokens``); embedding inputs then
take the tokens it left, but never less than a quarter of the budget. So neither kind starves the other: a step
carrying a full prefill chunk plus embeddings costs at most 1.25 budgets (a decode's latency grows by a quarter at
worst), and queued embeddings advance by at least a quarter budget every step however busy generation is. An
input is never split (without a cache there is nothing to carry a chunk over): one longer than the share runs
alone, as the first of its step, and costs what its prefill would. The embedding inputs of a step run in one
forward of their own, after the generation rows' forward.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..model.attention import DecodeRows
from ..model.dense import DenseAttention, build_dense_attention
from ..model.falcon import FalconForCausalLM
from .errors import InvalidRequestError
from .pooling import PoolingConfig, PoolingParams, finish_embedding, pool
from .scheduler import QueueFullError
from .validation import check_token_ids

MIN_SHARE = 4  # embeddings get at least 1 / MIN_SHARE of the token budget in every step


@dataclass
class EmbeddingRequest:
    """One queued input, with its pooling settled (the request's params over the model's defaults)."""

    request_id: str
    prompt_token_ids: list[int]
    pooling_type: str
    normalize: bool
    dimensions: int | None
    arrival_time: float


@dataclass
class PooledOutput:
    """A finished embedding request: its vector and how many input tokens it took."""

    request_id: str
    embedding: list[float]
    num_prompt_tokens: int


@dataclass
class PackedPrefillAttention:
    """Attention for inputs packed one after another into a [1, N] sequence, each causal within itself only, with
    no cache. Inputs come sorted by length; each run of equal length is one batched SDPA call through the dense
    path's context (``groups``: start in the packed sequence, number of inputs, their length, that context), so a
    RoPE or ALiBi input is attended exactly as the HF-style call attends it alone."""

    groups: list[tuple[int, int, int, DenseAttention]]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [1, Hq, N, d]; k, v: [1, G, N, d]
        out = torch.empty_like(q)
        for start, count, length, ctx in self.groups:
            end = start + count * length
            folded = [_fold(x[0, :, start:end], count, length) for x in (q, k, v)]
            result = ctx.attend(layer, *folded)  # [count, Hq, L, d]
            out[0, :, start:end] = result.transpose(0, 1).flatten(1, 2)
        return out

    def decode_rows(self) -> DecodeRows | None:
        return None


def _fold(x: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """[H, count * L, d] -> [count, H, L, d] (a view)."""
    return x.unflatten(1, (count, length)).transpose(0, 1)


class Embedder:
    """The embedding queue and its forward: :meth:`add` requests, :meth:`step` runs a share of them."""

    def __init__(
        self,
        model: FalconForCausalLM,
        defaults: PoolingConfig,
        max_model_len: int,
        token_budget: int,
        max_waiting: int | None = None,
    ) -> None:
        self.model = model
        self.defaults = defaults
        self.max_model_len = max_model_len
        self.token_budget = token_budget
        self.max_waiting = max_waiting
        self.waiting: dict[str, EmbeddingRequest] = {}  # insertion order is FIFO order
        self.num_waiting_tokens = 0
        self.num_requests = 0  # finished since start
        self.num_prompt_tokens = 0

    # ---- requests -------------------------------------------------------------------------------------------------
    def add(self, request_id: str, prompt_token_ids: Sequence[int], params: PoolingParams) -> None:
        """Queue an input; ValueErrors (naming the field) for one that cannot run, QueueFullError when full."""
        cfg = self.model.config
        ids = check_token_ids(prompt_token_ids, cfg.vocab_size, "prompt")
        if not ids:
            raise InvalidRequestError("prompt is empty: an embedding needs at least one token", "prompt")
        if len(ids) > self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(ids)} tokens, over the model's context of {self.max_model_len}", "prompt"
            )
        if params.dimensions is not None and params.dimensions > cfg.hidden_size:
            raise InvalidRequestError(
                f"dimensions {params.dimensions} is over the model's hidden size {cfg.hidden_size}", "dimensions"
            )
        limit = self.max_waiting_tokens
        if limit is not None and self.num_waiting_tokens + len(ids) > limit:
            raise QueueFullError(f"the embedding queue is full ({self.num_waiting_tokens} tokens waiting)")
        self.num_waiting_tokens += len(ids)
        self.waiting[request_id] = EmbeddingRequest(
            request_id,
            ids,
            params.pooling_type or self.defaults.pooling_type,
            self.defaults.normalize if params.normalize is None else params.normalize,
            params.dimensions,
            time.monotonic(),
        )

    def abort(self, request_id: str) -> bool:
        """Drop a queued request; False if it is not here."""
        request = self.waiting.pop(request_id, None)
        if request is not None:
            self.num_waiting_tokens -= len(request.prompt_token_ids)
        return request is not None

    @property
    def max_waiting_tokens(self) -> int | None:
        """The queue's limit: the tokens of ``max_waiting`` full-context prompts (what the generation queue may
        hold), counted in tokens because one API request may carry thousands of short inputs."""
        return None if self.max_waiting is None else self.max_waiting * self.max_model_len

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.waiting

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting)

    # ---- the step -------------------------------------------------------------------------------------------------
    def step(self, tokens_left: int) -> list[PooledOutput]:
        """Run this step's share of the queue (see the module docstring); their outputs, all finished."""
        batch = self._take(max(tokens_left, self.token_budget // MIN_SHARE, 1))
        return self._run(batch) if batch else []

    def _take(self, share: int) -> list[EmbeddingRequest]:
        """Queued inputs, FIFO, within ``share`` tokens; the first one whatever its length."""
        batch: list[EmbeddingRequest] = []
        used = 0
        for request in self.waiting.values():
            n = len(request.prompt_token_ids)
            if batch and used + n > share:
                break
            batch.append(request)
            used += n
        for request in batch:
            del self.waiting[request.request_id]
        self.num_waiting_tokens -= used
        return batch

    @torch.inference_mode()
    def _run(self, batch: list[EmbeddingRequest]) -> list[PooledOutput]:
        """One forward over the packed inputs (shortest first), then each input's pooling."""
        weight = self.model.transformer.ln_f.weight  # the activations' dtype and device
        ordered = sorted(batch, key=lambda r: len(r.prompt_token_ids))
        ids: list[int] = []
        positions: list[int] = []
        groups = []
        for length, members in itertools.groupby(ordered, key=lambda r: len(r.prompt_token_ids)):
            members = list(members)
            ctx = build_dense_attention(self.model.config, length, None, None, weight.dtype, weight.device, 1)
            groups.append((len(ids), len(members), length, ctx))
            for request in members:
                ids += request.prompt_token_ids
                positions += range(length)
        input_ids = torch.tensor([ids], device=weight.device)
        position_ids = torch.tensor([positions], device=weight.device)
        hidden = self.model.forward_hidden(input_ids, position_ids, PackedPrefillAttention(groups))[0]  # [N, H]
        outputs: dict[str, PooledOutput] = {}
        start = 0
        for request in ordered:
            n = len(request.prompt_token_ids)
            vector = finish_embedding(pool(hidden[start : start + n], request.pooling_type), request.normalize,
                                      request.dimensions)  # fmt: skip
            outputs[request.request_id] = PooledOutput(request.request_id, vector.cpu().tolist(), n)
            start += n
        self.num_requests += len(batch)
        self.num_prompt_tokens += len(ids)
        return [outputs[r.request_id] for r in batch]
