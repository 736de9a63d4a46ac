"""What the completion and chat routes share: the engine, settings, metrics, token texts, common checks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from pydantic import BaseModel

from ..engine.async_engine import AsyncEngine
from ..engine.engine import StepOutput
from .drain import OpenRequests
from .embedding import check_generation_task
from .errors import CONFLICTING_PARAMETERS, bad_request, from_value_error
from .generation import Choice, Generation
from .inputs import check_model
from .logprobs import TokenTexts
from .metrics import ServerMetrics
from .settings import ServerSettings

ResponseT = TypeVar("ResponseT", bound=BaseModel)


class Serving:
    """Base of CompletionServing and ChatServing."""

    def __init__(
        self,
        engine: AsyncEngine,
        settings: ServerSettings,
        metrics: ServerMetrics,
        open_requests: OpenRequests | None = None,
    ) -> None:
        self.engine, self.settings, self.metrics = engine, settings, metrics
        self.open_requests = open_requests if open_requests is not None else OpenRequests()
        self._texts: TokenTexts | None = None

    @property
    def texts(self) -> TokenTexts:
        if self._texts is None:
            self._texts = TokenTexts(self.engine.tokenizer)
        return self._texts

    async def outputs(self, generation: Generation) -> AsyncIterator[tuple[Choice, StepOutput]]:
        """``generation.outputs()``, registered as open so a shutdown past its deadline can end it."""
        with self.open_requests.track(generation.stream):
            async for item in generation.outputs():
                yield item

    def check_request(self, request) -> None:
        """The model name, fields falconlm refuses, stream_options only with stream, the --max-logprobs cap."""
        check_model(request.model, self.settings)
        check_generation_task(self.engine)
        try:
            request.check_unsupported()
        except ValueError as exc:
            raise from_value_error(exc) from exc
        if request.stream_options is not None and not request.stream:
            raise bad_request(
                "stream_options is only allowed when stream is true", "stream_options", CONFLICTING_PARAMETERS
            )
        chat = hasattr(request, "messages")
        name, asked = ("top_logprobs", request.top_logprobs) if chat else ("logprobs", request.logprobs)
        if chat and asked is not None and not request.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", name, CONFLICTING_PARAMETERS)
        if (request.n or 1) > self.settings.max_choices:
            raise bad_request(f"n must be at most {self.settings.max_choices} (--max-choices)", "n")
        limit = self.settings.max_logprobs
        if asked is not None and asked > limit:
            raise bad_request(f"{name} must be at most {limit} on this server (--max-logprobs)", name)


async def build_off_loop(build: Callable[[], ResponseT]) -> ResponseT:
    """``build()`` on a worker thread: a reply with many choices and logprobs takes a while to build, and the
    event loop keeps answering other requests meanwhile."""
    return await asyncio.to_thread(build)
