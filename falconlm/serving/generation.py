"""One API request's engine requests: one per prompt, each with its n choices, submitted together and merged.

Prompt ``p`` is engine request ``{id}-{p}``; its n choices are the engine's child sequences (seed ``seed + i``
for choice ``i``, see ``engine/parallel_sampling.py``), numbered ``p * n + i`` in the response.
Engine exceptions become OpenAI errors here: a full waiting queue 429, loading or shutting down 503, an engine
failure 500.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from ..engine.async_engine import AsyncEngine, EngineError, EngineNotReadyError, EngineStoppedError, RequestStream
from ..engine.engine import StepOutput
from ..engine.parallel_sampling import child_seed, sequence_ids
from ..engine.request import RequestEvent, RequestEventType, first_event_time
from ..engine.sampler import TokenLogprobs
from ..engine.sampling_params import SamplingParams
from ..engine.scheduler import QueueFullError
from .errors import APIError, EngineUnavailable, QueueFull, from_value_error
from .metrics import RequestTimer, ServerMetrics
from .protocol import UsageInfo

__all__ = ["Choice", "Generation", "child_seed", "engine_error", "new_request_id"]


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def engine_error(exc: Exception, retry_after: int) -> APIError:
    """The OpenAI error for an exception raised by the AsyncEngine."""
    if isinstance(exc, QueueFullError):
        return QueueFull(f"the server is busy: {exc}; retry later", retry_after)
    if isinstance(exc, EngineNotReadyError):
        return EngineUnavailable("the model is still loading; retry later", retry_after)
    if isinstance(exc, EngineStoppedError):
        return EngineUnavailable("the server is shutting down", retry_after)
    if isinstance(exc, EngineError):
        return APIError(500, str(exc))
    if isinstance(exc, ValueError):
        return from_value_error(exc)
    return APIError(500, "internal server error; see the server log")


@dataclass
class Choice:
    """One engine request, accumulating its output as the stream goes."""

    index: int
    prompt_index: int
    request_id: str
    timer: RequestTimer
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # with SamplingParams.prompt_logprobs
    events: list[RequestEvent] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class Generation:
    """Submit with :meth:`start`; iterate for ``(choice, step output)`` pairs; :meth:`abort` when leaving early."""

    def __init__(self, stream: RequestStream, choices: list[Choice], prompt_lens: list[int], metrics: ServerMetrics):
        self.stream = stream
        self.choices = choices
        self.prompt_lens = prompt_lens
        self.metrics = metrics
        self._by_request_id = {c.request_id: c for c in choices}

    @classmethod
    async def start(
        cls,
        engine: AsyncEngine,
        request_id: str,
        prompts: Sequence[list[int]],
        params: Sequence[SamplingParams],
        metrics: ServerMetrics,
        arrival: float,
        retry_after: int = 1,
    ) -> Generation:
        requests, choices = [], []
        for prompt_index, (ids, sp) in enumerate(zip(prompts, params, strict=True)):
            parent_id = f"{request_id}-{prompt_index}"
            requests.append((parent_id, ids, sp))
            for child_id in sequence_ids(parent_id, sp.n):
                choices.append(Choice(len(choices), prompt_index, child_id, RequestTimer(metrics, arrival)))
        try:
            stream = await engine.add(requests)
        except Exception as exc:
            raise engine_error(exc, retry_after) from exc
        metrics.prompt_tokens.inc(sum(len(ids) * sp.n for _, ids, sp in requests))
        return cls(stream, choices, [len(p) for p in prompts], metrics)

    async def outputs(self) -> AsyncIterator[tuple[Choice, StepOutput]]:
        """Outputs in arrival order; EngineError (as raised by the engine) ends the iteration early."""
        async for out in self.stream:
            choice = self._by_request_id[out.request_id]
            now = time.monotonic()
            choice.events.extend(out.events)
            first_token = first_event_time(out.events, RequestEventType.FIRST_TOKEN)
            choice.timer.on_tokens(len(out.token_ids), now, first_token)
            choice.text += out.text
            choice.token_ids.extend(out.token_ids)
            if choice.prompt_logprobs is None:
                choice.prompt_logprobs = out.output.prompt_logprobs
            if out.output.logprobs and out.token_ids:
                choice.logprobs.extend(out.output.logprobs[-len(out.token_ids) :])
            if out.finished:
                choice.finish_reason = out.output.finish_reason
                choice.stop_reason = out.output.stop_reason
                scheduled = first_event_time(choice.events, RequestEventType.SCHEDULED)
                choice.timer.on_finish(choice.finish_reason, scheduled, now)
            yield choice, out

    async def run_to_end(self, retry_after: int = 1) -> list[Choice]:
        """Every choice, finished; an engine failure becomes an APIError."""
        try:
            async for _ in self.outputs():
                pass
        except EngineError as exc:
            raise engine_error(exc, retry_after) from exc
        finally:
            self.abort()
        return self.choices

    def abort(self) -> None:
        """Stop the unfinished choices; each counts once as finish_reason "abort" in the metrics."""
        self.stream.abort()
        for choice in self.choices:
            if choice.finish_reason is None:
                choice.finish_reason = "abort"
                choice.timer.on_abort()

    def usage(self) -> UsageInfo:
        prompt = sum(self.prompt_lens)
        completion = sum(len(c.token_ids) for c in self.choices)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
