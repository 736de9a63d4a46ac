"""``build_app(engine, settings)``: the FastAPI routes of the OpenAI-compatible server, and nothing else.

The work behind each route lives beside this file: ``serving_*.py`` (requests to engine calls to responses),
``auth.py``, ``limits.py`` and ``browser.py`` (middleware), ``body.py`` (request bodies), ``errors.py`` (error
objects), ``openapi.py`` (the contract), ``metrics.py``, ``sse.py``, ``drain.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.responses import Response

from .. import __version__
from ..engine.async_engine import AsyncEngine
from .auth import APIKeyMiddleware
from .body import read_json
from .browser import install_browser_checks
from .disconnect import cancel_on_disconnect
from .drain import OpenRequests
from .errors import APIError, EngineUnavailable, error_response, install_error_handlers
from .inputs import context_limit
from .limits import BodySizeLimitMiddleware
from .metrics import ServerMetrics
from .openapi import GENERATION_ERRORS, JSON_BODY_ERRORS, below_pattern, documented, install_openapi
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from .replies import http_reply
from .serving_chat import ChatServing
from .serving_completion import CompletionServing
from .serving_models import ModelServing
from .settings import ServerSettings


class HealthResponse(BaseModel):
    status: str


async def http_reply_of(result: Awaitable[BaseModel | AsyncIterator[BaseModel]]) -> Response:
    return await http_reply(await result)


def build_app(engine: AsyncEngine, settings: ServerSettings, shutdown_timeout: float = 5.0) -> FastAPI:
    """The server app. Its lifespan starts ``engine`` if needed and shuts it down (``shutdown_timeout`` s)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not engine.started:
            engine.start()
        yield
        await asyncio.to_thread(engine.shutdown, shutdown_timeout)

    app = FastAPI(title="falconlm", version=__version__, lifespan=lifespan)
    app.state.metrics = metrics = ServerMetrics(lambda: engine.stats)
    app.state.open_requests = open_requests = OpenRequests()
    completions = CompletionServing(engine, settings, metrics, open_requests)
    chat = ChatServing(engine, settings, metrics, open_requests)
    models = ModelServing(engine, settings)
    install_error_handlers(app)
    uploads = ("/v1/files",) if settings.state_dir is not None else ()  # the batch router limits its own uploads
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes, exempt_paths=uploads)
    app.add_middleware(APIKeyMiddleware, api_keys=settings.api_keys)  # no key, no body read
    install_browser_checks(app, settings.bind_host, settings.allowed_hosts, settings.allowed_origins)  # outermost
    require_json_type = not settings.api_keys  # see body.py

    def require_ready() -> None:
        if not engine.is_ready:
            retry = settings.retry_after_seconds
            if engine.load_error is not None:
                raise EngineUnavailable(f"the model failed to load: {engine.load_error}", retry)
            message = "the model is still loading" if engine.is_loading else "the server is not running"
            raise EngineUnavailable(message, retry)

    @app.get("/health", **documented(response=HealthResponse, errors=(503,)))
    async def health() -> Response:
        try:
            require_ready()
        except APIError as exc:
            return error_response(exc)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", **documented(media_type="text/plain"))
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", **documented(response=ModelList))
    async def list_models() -> Response:
        return JSONResponse(models.models().model_dump())

    @app.get("/v1/models/{model_id:path}", **documented(response=ModelCard, errors=(404,)))
    async def get_model(model_id: str) -> Response:
        return JSONResponse(models.model(model_id).model_dump())

    @app.post(
        "/v1/completions",
        **documented(CompletionRequest, CompletionResponse, CompletionStreamResponse, GENERATION_ERRORS),
    )
    async def create_completion(http_request: Request) -> Response:
        require_ready()
        request = await read_json(http_request, CompletionRequest, require_json_type)
        return await cancel_on_disconnect(http_request, http_reply_of(completions.create(request)))

    @app.post(
        "/v1/chat/completions",
        **documented(ChatCompletionRequest, ChatCompletionResponse, ChatCompletionStreamResponse, GENERATION_ERRORS),
    )
    async def create_chat_completion(http_request: Request) -> Response:
        require_ready()
        request = await read_json(http_request, ChatCompletionRequest, require_json_type)
        return await cancel_on_disconnect(http_request, http_reply_of(chat.create(request)))

    @app.post("/tokenize", **documented(TokenizeRequest, TokenizeResponse, errors=(*JSON_BODY_ERRORS, 404, 503)))
    async def tokenize(http_request: Request) -> Response:
        require_ready()
        request = await read_json(http_request, TokenizeRequest, require_json_type)
        return JSONResponse((await models.tokenize(request)).model_dump())

    @app.post("/detokenize", **documented(DetokenizeRequest, DetokenizeResponse, errors=(*JSON_BODY_ERRORS, 404, 503)))
    async def detokenize(http_request: Request) -> Response:
        require_ready()
        request = await read_json(http_request, DetokenizeRequest, require_json_type)
        return JSONResponse(models.detokenize(request).model_dump())

    def limits() -> dict[str, Any] | None:
        """The bounds the OpenAPI document states that depend on the loaded model (None while it loads)."""
        if not engine.is_ready:
            return None
        context = context_limit(engine)
        return {
            "model": list(settings.served_model_names),
            "choices": settings.max_choices,
            "logprobs": settings.max_logprobs,
            "max_tokens": context - 1,
            "prompt_tokens": context - 1,
            "prompts": settings.max_choices,
            "token_id": engine.vocab_size - 1,
            "logit_bias": below_pattern(engine.vocab_size),
        }

    if settings.state_dir is not None:
        from ..batch.routes import BatchService, mount_batches

        mount_batches(app, BatchService(settings.state_dir, engine, settings, metrics, settings.max_upload_bytes))
    install_openapi(app, limits, bearer=bool(settings.api_keys))
    return app
