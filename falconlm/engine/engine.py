"""Engine: continuous batching over a paged KV cache. A step is three calls (schedule, execute, update).

Text exists only here, at the edge: the scheduler and runner see token ids; the engine's per-request output
state turns them into text pieces (incremental detokenizer) and cuts at stop strings, finishing the request
in the scheduler when one completes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..model.falcon import FalconForCausalLM
from ..model.paged_attention import PagedKVCache
from ..tokenizer import Tokenizer
from .detokenizer import IncrementalDetokenizer, StopMatcher
from .kv_cache_manager import KVCacheManager
from .memory import check_max_model_len, kv_cache_blocks
from .outputs import CompletionOutput
from .request import FINISH_REASON, Request, RequestStatus
from .runner import ModelRunner
from .sampling_params import SamplingParams
from .scheduler import Scheduler


@dataclass
class EngineConfig:
    """Capacity settings. ``num_blocks`` None sizes the pool for ``max_num_seqs`` full-length sequences,
    capped by ``kv_cache_memory`` bytes when given, else by the free memory (see ``memory.kv_cache_blocks``)."""

    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory: int | None = None
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    max_waiting: int | None = None
    deterministic: bool = False  # batch-invariant kernels on every path (runner.py)


@dataclass
class StepOutput:
    """What one request gained in one step."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    output: CompletionOutput


@dataclass
class _OutputState:
    detok: IncrementalDetokenizer
    stop: StopMatcher
    output: CompletionOutput = field(default_factory=lambda: CompletionOutput(index=0))


class Engine:
    """Add requests, call :meth:`step` until :meth:`has_unfinished` is false; read each step's outputs."""

    def __init__(self, model: FalconForCausalLM, tokenizer: Tokenizer, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        self.model, self.tokenizer = model, tokenizer
        self.max_model_len = check_max_model_len(model.config, config.max_model_len)
        num_blocks = self._num_blocks(model, config)
        self.kv_cache_manager = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.kv_cache_manager, config.max_num_seqs, config.max_num_batched_tokens, config.max_waiting
        )
        self.runner = ModelRunner(model, num_blocks, config.block_size, config.deterministic)
        self._states: dict[str, _OutputState] = {}

    def _num_blocks(self, model: FalconForCausalLM, config: EngineConfig) -> int:
        if config.num_blocks is not None:
            return config.num_blocks
        cfg = model.config
        per_block = PagedKVCache.bytes_per_block(
            cfg.num_hidden_layers,
            config.block_size,
            cfg.num_kv_groups,
            cfg.head_dim,
            model.transformer.ln_f.weight.element_size(),
        )
        device = model.transformer.ln_f.weight.device
        return kv_cache_blocks(
            per_block, config.block_size, config.max_num_seqs, self.max_model_len, config.kv_cache_memory, device
        )

    # ---- requests ---------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Queue a request; ValueError for an empty prompt or one that leaves no room in the context."""
        if request_id in self._states:
            raise ValueError(f"request id {request_id!r} is already in use")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_token_ids)} tokens, the model's context is {self.max_model_len}")
        vocab = self.model.config.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        bad = next((t for t in (params.logit_bias or {}) if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"logit_bias token id {bad} is outside the vocabulary [0, {vocab})")
        eos = None if params.ignore_eos else self.tokenizer.eos_token_id
        request = Request(request_id, list(prompt_token_ids), params, eos, time.monotonic(), self.max_model_len)
        capacity = self.runner.cache.num_blocks * self.config.block_size
        if request.num_prompt_tokens + request.max_tokens > capacity:
            raise ValueError(
                f"prompt ({request.num_prompt_tokens} tokens) plus max_tokens ({request.max_tokens}) "
                f"exceeds the KV cache capacity of {capacity} tokens"
            )
        self.scheduler.add_request(request)
        self._states[request_id] = _OutputState(
            IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens), StopMatcher(params.stop or [])
        )

    def abort(self, request_id: str) -> None:
        """Stop a request now; its blocks are free when this returns."""
        if self._states.pop(request_id, None) is not None:
            self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_ABORTED)
            self.runner.free(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step ---------------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        scheduled = self.scheduler.schedule()
        runner_output = self.runner.execute(scheduled)
        updates = self.scheduler.update_from_output(scheduled, runner_output)
        outputs = [self._abort_output(r) for r in scheduled.aborted]
        for update in updates:
            outputs.append(self._process(update.request, update.new_token_ids, update.logprobs, update.finished))
        return outputs

    def _process(self, request: Request, new_ids: list[int], logprobs: list, finished: bool) -> StepOutput:
        state = self._states[request.request_id]
        out = state.output
        text = ""
        for token_id, lp in zip(new_ids, logprobs, strict=True):
            out.token_ids.append(token_id)
            if lp is not None:
                if out.logprobs is None:
                    out.logprobs = []
                out.logprobs.append(lp)
            if finished and token_id == new_ids[-1] and request.status == RequestStatus.FINISHED_STOPPED:
                break  # EOS or a stop token: not part of the text
            piece, stopped = state.stop.feed(state.detok.add(token_id))
            text += piece
            if stopped:
                self.scheduler.finish_requests([request.request_id], RequestStatus.FINISHED_STOPPED)
                request.stop_reason = "stop_string"
                finished = True
                break
        if finished and not state.stop.stopped:
            piece, stopped = state.stop.feed(state.detok.finish())
            text += piece if stopped else piece + state.stop.flush()
        if finished:
            out.finish_reason = "stop" if state.stop.stopped else FINISH_REASON.get(request.status, "stop")
            out.stop_reason = request.stop_reason
            self._states.pop(request.request_id, None)
            self.runner.free(request.request_id)
        out.text += text
        return StepOutput(request.request_id, text, new_ids, finished, out)

    def _abort_output(self, request: Request) -> StepOutput:
        state = self._states.pop(request.request_id)
        state.output.finish_reason = "abort"
        self.runner.free(request.request_id)
        return StepOutput(request.request_id, "", [], True, state.output)

    # ---- offline convenience ----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> list[CompletionOutput]:
        """Run a set of requests to the end; one CompletionOutput per prompt, in order."""
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = [f"offline-{id(self)}-{i}" for i in range(len(prompts))]
        for rid, prompt, sp in zip(ids, prompts, params, strict=True):
            self.add_request(rid, prompt, sp)
        results: dict[str, CompletionOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    results[out.request_id] = out.output
        return [results[rid] for rid in ids]
