"""What the completion and chat routes share: the engine, settings, metrics, token texts, common checks."""

from __future__ import annotations

from ..engine.async_engine import AsyncEngine
from .errors import bad_request
from .inputs import check_model
from .logprobs import TokenTexts
from .metrics import ServerMetrics
from .settings import ServerSettings


class Serving:
    """Base of CompletionServing and ChatServing."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.engine, self.settings, self.metrics = engine, settings, metrics
        self._texts: TokenTexts | None = None

    @property
    def texts(self) -> TokenTexts:
        if self._texts is None:
            self._texts = TokenTexts(self.engine.tokenizer)
        return self._texts

    def check_request(self, request) -> None:
        """The model name, and stream_options only with stream."""
        check_model(request.model, self.settings)
        if request.stream_options is not None and not request.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
