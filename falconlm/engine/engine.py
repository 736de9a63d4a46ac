"""Engine: continuous batching over a paged KV cache. A step is three calls (schedule, execute, update).

Text exists only here, at the edge: the scheduler and runner see token ids; the engine's per-request output
state turns them into text pieces (incremental detokenizer) and cuts at stop strings, finishing the request
in the scheduler when one completes. A request with n > 1 runs as child sequences (``parallel_sampling.py``);
prompt logprobs come from the runner's rows in the step and go out with the request's first token.
A request added with :class:`PoolingParams` is an embedding request: it skips the scheduler and the KV cache and
runs in the step's embedding share (``embedding.py``); its one output carries ``embedding``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial

from ..model.falcon import FalconForCausalLM
from ..model.paged_attention import PagedKVCache
from ..model.positions import prompt_rope_salt
from ..tokenizer import Tokenizer
from .detokenizer import IncrementalDetokenizer, StopMatcher
from .embedding import Embedder, PooledOutput
from .errors import DuplicateRequestIdError, InvalidRequestError
from .kv_cache_manager import KVCacheManager
from .memory import check_max_model_len, kv_cache_blocks
from .outputs import CompletionOutput
from .parallel_sampling import child_sequences
from .pooling import PoolingConfig, PoolingParams
from .request import FINISH_REASON, Request, RequestEvent, RequestEventType, RequestStatus
from .runner import ModelRunner
from .sampler import TokenLogprobs
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .stats import EngineStats
from .structured_output import GrammarCompiler
from .tp_runner import TensorParallelDriver
from .validation import RequestValidator


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
    task: str = "generate"  # "embed": embedding requests only, and a KV pool of one full-length sequence
    pooling: PoolingConfig = field(default_factory=PoolingConfig)  # embedding requests' defaults (pooling.py)
    # Most model steps one schedule runs while every running request decodes and none waits (a decode run,
    # Scheduler._run_length), as vLLM's --num-scheduler-steps; fewer where a step is slow (DECODE_RUN_SECONDS).
    # 1: one step per schedule.
    num_scheduler_steps: int = 16


# A decode run is cut to about this long: its requests' tokens reach their streams once a run, and a request that
# arrives meanwhile waits for the run's end. A step that takes longer runs alone.
DECODE_RUN_SECONDS = 0.05


@dataclass
class StepOutput:
    """What one sequence gained in one step. ``parent_id`` is the request it belongs to (itself unless n > 1;
    ``output.index`` is its place among the parent's outputs); ``events`` are its lifecycle events since its
    previous output."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    output: CompletionOutput
    parent_id: str = ""
    events: list[RequestEvent] = field(default_factory=list)
    embedding: list[float] | None = None  # an embedding request's vector (its only output)


@dataclass
class _OutputState:
    detok: IncrementalDetokenizer
    stop: StopMatcher
    output: CompletionOutput
    parent_id: str
    prompt_logprobs: list[TokenLogprobs | None] | None  # by prompt position, filled as the prompt is computed
    num_events_sent: int = 0


class Engine:
    """Add requests, call :meth:`step` until :meth:`has_unfinished` is false; read each step's outputs."""

    def __init__(self, model: FalconForCausalLM, tokenizer: Tokenizer, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        self.model, self.tokenizer = model, tokenizer
        self.max_model_len = check_max_model_len(model.config, config.max_model_len)
        if getattr(model.config, "recurrent", False):  # Mamba: a state slot per sequence instead of KV blocks
            from .recurrent_engine import recurrent_parts

            self.kv_cache_manager, self.runner, capacity = recurrent_parts(model, config, self.max_model_len)
        elif getattr(model.config, "hybrid", False):  # Falcon-H1: KV blocks and a state slot per sequence
            from .hybrid_engine import hybrid_parts

            self.kv_cache_manager, self.runner, capacity = hybrid_parts(model, config, self.max_model_len)
        else:
            num_blocks = self._num_blocks(model, config)
            salt = partial(prompt_rope_salt, model.config)  # dynamic RoPE: a long prompt's keys depend on its length
            self.kv_cache_manager = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching, salt)
            self.runner = ModelRunner(model, num_blocks, config.block_size, config.deterministic)
            capacity = num_blocks * config.block_size
        self.scheduler = Scheduler(
            self.kv_cache_manager, config.max_num_seqs, config.max_num_batched_tokens, config.max_waiting
        )
        self.validator = RequestValidator(model.config.vocab_size, self.max_model_len, capacity)
        self.embedder = Embedder(
            model, config.pooling, self.max_model_len, config.max_num_batched_tokens, config.max_waiting
        )
        self.grammars = GrammarCompiler(tokenizer, model.config.vocab_size)  # structured output, compiled once
        self.num_steps = 0
        self._decode_step_seconds: float | None = None  # the last decode-only step's time per model step
        self.parallel_driver: TensorParallelDriver | None = None  # rank 0 of a tensor-parallel group (tp_runner.py)
        self._states: dict[str, _OutputState] = {}  # sequence id -> its output state
        self._children: dict[str, list[str]] = {}  # parent id -> its sequence ids, for n > 1

    def _num_blocks(self, model: FalconForCausalLM, config: EngineConfig) -> int:
        if config.num_blocks is not None:
            return config.num_blocks
        if config.task == "embed":  # generation is refused: room for one sequence keeps the context limit whole
            return -(-self.max_model_len // config.block_size)
        cfg = model.config
        per_block = PagedKVCache.bytes_per_block(
            cfg.num_hidden_layers,
            config.block_size,
            cfg.num_kv_groups,
            cfg.head_dim,
            model.final_norm.weight.element_size(),
        )
        device = model.final_norm.weight.device
        return kv_cache_blocks(
            per_block, config.block_size, config.max_num_seqs, self.max_model_len, config.kv_cache_memory, device
        )

    # ---- requests ---------------------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams | PoolingParams
    ) -> list[str]:
        """Queue a request (``params.n`` sequences, all or none); returns the sequence ids. With PoolingParams it
        is an embedding request (``embedding.py``).

        Raises the typed errors of ``validation.py`` (ValueErrors) for a request that cannot run, and
        QueueFullError when the waiting queue is full."""
        if isinstance(params, PoolingParams):
            if self.parallel_driver is not None:  # the embedder's forwards are not sent to the other ranks
                raise InvalidRequestError("embeddings are not served with tensor parallelism", "input")
            if self._in_use(request_id):
                raise DuplicateRequestIdError(request_id)
            self.embedder.add(request_id, prompt_token_ids, params)
            return [request_id]
        if self.config.task == "embed":
            raise InvalidRequestError("this engine runs its model for embeddings only (task embed)", "task")
        children = child_sequences(request_id, params)
        taken = next((i for i in (request_id, *(c.request_id for c in children)) if self._in_use(i)), None)
        if taken is not None:
            raise DuplicateRequestIdError(taken)
        prompt = self.validator.validate(prompt_token_ids, params)
        grammar = None if params.structured_output is None else self.grammars.compile(params.structured_output)
        eos = None if params.ignore_eos else self.tokenizer.eos_token_id
        added: list[str] = []
        try:
            for child in children:
                sp = child.params
                request = Request(child.request_id, prompt, sp, eos, time.monotonic(), self.max_model_len)
                request.grammar = None if grammar is None else grammar.new_state()
                self.scheduler.add_request(request)
                added.append(child.request_id)
                self._states[child.request_id] = _OutputState(
                    IncrementalDetokenizer(self.tokenizer, sp.skip_special_tokens),
                    StopMatcher(sp.stop or []),
                    CompletionOutput(index=child.index),
                    request_id,
                    None if sp.prompt_logprobs is None else [None],
                )
        except BaseException:
            for sequence_id in added:
                self.abort(sequence_id)
            raise
        if params.n > 1:
            self._children[request_id] = added
        return added

    def abort(self, request_id: str) -> None:
        """Stop a request (all its sequences, given a parent id) now; its blocks are free when this returns."""
        self.embedder.abort(request_id)
        for sequence_id in self.sequence_ids(request_id):
            if sequence_id in self._states:
                self.scheduler.finish_requests([sequence_id], RequestStatus.FINISHED_ABORTED)
                self._forget(sequence_id)

    def sequence_ids(self, request_id: str) -> list[str]:
        """The unfinished sequences of a parent request with n > 1, else ``[request_id]`` itself."""
        return list(self._children.get(request_id, [request_id]))

    def close(self) -> None:
        """Release what outlives the engine: under tensor parallelism, tell the other ranks to stop."""
        if self.parallel_driver is not None:
            self.parallel_driver.stop()

    def stats(self) -> EngineStats:
        """A frozen snapshot of the load, built by the scheduler and the KV-cache manager."""
        stats = EngineStats.combine(self.scheduler.stats(), self.kv_cache_manager.stats(), self.num_steps)
        return replace(stats, num_waiting=stats.num_waiting + self.embedder.num_waiting)

    def _in_use(self, request_id: str) -> bool:
        return request_id in self._states or request_id in self._children or request_id in self.embedder

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self.embedder.has_unfinished()

    # ---- the step ---------------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        scheduled = self.scheduler.schedule(self._run_steps())
        started = time.perf_counter()
        runner_output = self.runner.execute(scheduled)
        if scheduled.scheduled and scheduled.num_batched_tokens == len(scheduled.scheduled):  # decode rows only
            model_steps = 1 + max(map(len, runner_output.later_token_ids), default=0)
            self._decode_step_seconds = (time.perf_counter() - started) / model_steps
        self.num_steps += 1
        self._add_prompt_logprobs(runner_output.prompt_logprobs)
        updates = self.scheduler.update_from_output(scheduled, runner_output)
        outputs = [self._abort_output(r) for r in scheduled.aborted]
        for update in updates:
            outputs.append(self._process(update.request, update.new_token_ids, update.logprobs, update.finished))
        if self.embedder.has_unfinished():
            pooled = self.embedder.step(self.config.max_num_batched_tokens - scheduled.num_batched_tokens)
            outputs += [_embedding_output(p) for p in pooled]
        return outputs

    def _run_steps(self) -> int:
        """The decode run to ask the scheduler for: ``num_scheduler_steps``, fewer so that it lasts about
        DECODE_RUN_SECONDS at the last decode step's pace (one step until one has been timed, and while embedding
        requests wait for a step's leftover budget)."""
        most = self.config.num_scheduler_steps
        if most <= 1 or self._decode_step_seconds is None or self.embedder.has_unfinished():
            return 1
        if not self.runner.takes_decode_runs():
            return 1
        return max(1, min(most, int(DECODE_RUN_SECONDS / max(self._decode_step_seconds, 1e-6))))

    def _add_prompt_logprobs(self, scored: dict[str, tuple[int, list]]) -> None:
        """Extend each request's prompt logprobs with the positions it lacks (a recompute after preemption
        scores positions it has already)."""
        for request_id, (first, entries) in scored.items():
            state = self._states.get(request_id)
            if state is not None and state.prompt_logprobs is not None and first <= len(state.prompt_logprobs):
                state.prompt_logprobs.extend(entries[len(state.prompt_logprobs) - first :])

    def _process(self, request: Request, new_ids: list[int], logprobs: list, finished: bool) -> StepOutput:
        state = self._states[request.request_id]
        out = state.output
        if out.prompt_logprobs is None and state.prompt_logprobs is not None:
            out.prompt_logprobs = state.prompt_logprobs  # complete: the prompt is computed once a token is sampled
        if not out.token_ids and new_ids:
            request.record(RequestEventType.FIRST_TOKEN)
        text = ""
        for i, (token_id, lp) in enumerate(zip(new_ids, logprobs, strict=True)):
            out.token_ids.append(token_id)
            if lp is not None:
                if out.logprobs is None:
                    out.logprobs = []
                out.logprobs.append(lp)
            if finished and i == len(new_ids) - 1 and request.status == RequestStatus.FINISHED_STOPPED:
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
            self._forget(request.request_id)
        out.text += text
        events = _new_events(state, request)
        return StepOutput(request.request_id, text, new_ids, finished, out, state.parent_id, events)

    def _abort_output(self, request: Request) -> StepOutput:
        state = self._states[request.request_id]
        state.output.finish_reason = "abort"
        self._forget(request.request_id)
        return StepOutput(request.request_id, "", [], True, state.output, state.parent_id, _new_events(state, request))

    def _forget(self, sequence_id: str) -> None:
        """Drop a finished sequence's state (and its parent's, once every child finished)."""
        state = self._states.pop(sequence_id)
        self.runner.free(sequence_id)
        children = self._children.get(state.parent_id)
        if children is not None and not any(c in self._states for c in children):
            del self._children[state.parent_id]

    # ---- offline convenience ----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> list[CompletionOutput]:
        """Run a set of requests to the end; one CompletionOutput per prompt (its first when n > 1), in order."""
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = [f"offline-{id(self)}-{i}" for i in range(len(prompts))]
        for rid, prompt, sp in zip(ids, prompts, params, strict=True):
            self.add_request(rid, prompt, sp)
        results: dict[str, CompletionOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished and out.output.index == 0:
                    results[out.parent_id] = out.output
        return [results[rid] for rid in ids]


def _embedding_output(pooled: PooledOutput) -> StepOutput:
    """An embedding request's one output: finished, no text, the vector in ``embedding``."""
    done = CompletionOutput(index=0, finish_reason="stop")
    return StepOutput(pooled.request_id, "", [], True, done, pooled.request_id, embedding=pooled.embedding)


def _new_events(state: _OutputState, request: Request) -> list[RequestEvent]:
    """The request's events not yet sent with an output."""
    start, state.num_events_sent = state.num_events_sent, len(request.events)
    return request.events[start:]
