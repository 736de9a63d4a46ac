"""One stored batch request through the serving layer: its body in, a :class:`Result` (output or error line) out.

Each body goes through ``CompletionServing`` / ``ChatServing`` exactly as an online request would, so batch
responses are the server's responses; the typed response becomes the output line, a typed error the error line.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from ..engine.async_engine import AsyncEngine
from ..serving.chat import ChatServing
from ..serving.completion import CompletionServing
from ..serving.embedding import EmbeddingServing
from ..serving.embedding_protocol import EmbeddingResponse
from ..serving.errors import APIError, EngineUnavailable, QueueFull
from ..serving.metrics import ServerMetrics
from ..serving.protocol import ChatCompletionResponse, CompletionResponse
from ..serving.settings import ServerSettings
from .jsonl import CHAT_COMPLETIONS, COMPLETIONS, EMBEDDINGS, error_line, output_line, parse_body
from .records import PendingRequest, Result

RETRY_BUSY_S = 0.05


class LeftPending(Exception):
    """The request did not finish here (``engine_stopped``: loading or shutting down; else aborted): the next run
    does it."""

    def __init__(self, engine_stopped: bool) -> None:
        super().__init__("engine stopped" if engine_stopped else "aborted")
        self.engine_stopped = engine_stopped


class RequestExecutor:
    """Runs request bodies on an AsyncEngine, or on the one ``engine()`` returns when the first request needs it
    (so a job that only needs its files written loads no model). ``ignore_body_model`` drops each body's
    ``model`` (the CLI serves whatever ``--model`` is); the server keeps it and answers unknown names with an
    error line."""

    def __init__(
        self,
        engine: AsyncEngine | Callable[[], AsyncEngine],
        settings: ServerSettings,
        metrics: ServerMetrics | None = None,
        ignore_body_model: bool = False,
    ) -> None:
        self.settings = settings
        self.ignore_body_model = ignore_body_model
        self._engine = engine
        self._metrics = metrics
        self._servings: dict[str, CompletionServing | ChatServing | EmbeddingServing] | None = None

    @property
    def engine(self) -> AsyncEngine:
        if callable(self._engine):
            self._engine = self._engine()
        return self._engine

    def serving(self, url: str) -> CompletionServing | ChatServing | EmbeddingServing:
        """The serving class for an endpoint; the first call starts the engine."""
        if self._servings is None:
            engine = self.engine
            metrics = self._metrics or ServerMetrics(lambda: engine.stats)
            self._servings = {
                COMPLETIONS: CompletionServing(engine, self.settings, metrics),
                CHAT_COMPLETIONS: ChatServing(engine, self.settings, metrics),
                EMBEDDINGS: EmbeddingServing(engine, self.settings, metrics),
            }
        return self._servings[url]

    async def execute(self, row: PendingRequest) -> Result:
        """The request's result; waits while the engine's queue is full; raises :class:`LeftPending`."""
        try:
            request = parse_body(row.url, json.loads(row.body))
        except ValueError as exc:
            return failed(row.custom_id, "invalid_request_error", str(exc))
        if self.ignore_body_model:
            request.model = None
        while True:
            try:
                response = await self.serving(row.url).create(request)
                break
            except QueueFull:
                await asyncio.sleep(RETRY_BUSY_S)
            except EngineUnavailable as exc:
                raise LeftPending(engine_stopped=True) from exc
            except APIError as exc:
                return failed(row.custom_id, exc.error_code or exc.error_type, exc.message)
        if isinstance(response, EmbeddingResponse):  # no choices: an aborted one raised EngineUnavailable
            line = output_line(row.custom_id, response.model_dump(mode="json"))
            return Result(row.custom_id, "done", line, response.usage.prompt_tokens, 0)
        if not isinstance(response, CompletionResponse | ChatCompletionResponse):
            raise TypeError("a batch request never streams")  # parse_body refuses "stream"
        if any(choice.finish_reason == "abort" for choice in response.choices):
            raise LeftPending(engine_stopped=False)
        usage = response.usage
        line = output_line(row.custom_id, response.model_dump(mode="json"))
        return Result(row.custom_id, "done", line, usage.prompt_tokens, usage.completion_tokens)


def failed(custom_id: str, code: str, message: str) -> Result:
    """A request's error line."""
    return Result(custom_id, "failed", error_line(custom_id, code, message))
