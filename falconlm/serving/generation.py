"""One API request's engine requests: prompts x n choices, submitted together and merged into one stream.

Choice ``i`` of prompt ``p`` is engine request ``{id}-{p * n + i}`` with seed ``seed + i`` (wrapping around within
the signed 64-bit range the API accepts), so seeded choices differ from each other and repeat across calls.
Engine exceptions become OpenAI errors here: a full waiting queue 429, loading or shutting down 503, an engine
failure 500.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace

from ..engine.async_engine import AsyncEngine, EngineError, EngineNotReadyError, EngineStoppedError, RequestStream
from ..engine.engine import StepOutput
from ..engine.sampler import TokenLogprobs
from ..engine.sampling_params import SamplingParams
from ..engine.scheduler import QueueFullError
from .errors import APIError, EngineUnavailable, QueueFull, from_value_error
from .metrics import RequestTimer, ServerMetrics
from .protocol import UsageInfo


def child_seed(seed: int, child: int) -> int:
    """The seed of choice ``child``: ``seed + child``, wrapped into [-2**63, 2**63 - 1]."""
    return (seed + child + 2**63) % 2**64 - 2**63


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
            for child in range(sp.n):
                index = len(choices)
                try:
                    child_params = replace(sp, n=1, seed=None if sp.seed is None else child_seed(sp.seed, child))
                except ValueError as exc:
                    raise from_value_error(exc) from exc
                child_id = f"{request_id}-{index}"
                requests.append((child_id, ids, child_params))
                choices.append(Choice(index, prompt_index, child_id, RequestTimer(metrics, arrival)))
        try:
            stream = await engine.add(requests)
        except Exception as exc:
            raise engine_error(exc, retry_after) from exc
        metrics.prompt_tokens.inc(sum(len(ids) for _, ids, _ in requests))
        return cls(stream, choices, [len(p) for p in prompts], metrics)

    async def outputs(self) -> AsyncIterator[tuple[Choice, StepOutput]]:
        """Outputs in arrival order; EngineError (as raised by the engine) ends the iteration early."""
        async for out in self.stream:
            choice = self._by_request_id[out.request_id]
            now = time.monotonic()
            choice.timer.on_tokens(len(out.token_ids), now)
            choice.text += out.text
            choice.token_ids.extend(out.token_ids)
            if out.output.logprobs and out.token_ids:
                choice.logprobs.extend(out.output.logprobs[-len(out.token_ids) :])
            if out.finished:
                choice.finish_reason = out.output.finish_reason
                choice.stop_reason = out.output.stop_reason
                choice.timer.on_finish(choice.finish_reason, self.stream.scheduled_times.get(choice.request_id), now)
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
