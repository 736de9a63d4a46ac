"""``build_app(engine, settings)``: the FastAPI routes of the OpenAI-compatible server, and nothing else.

The work behind each route lives in ``falconlm.serving`` (requests to engine calls to typed responses). Beside
this file: ``replies.py`` (typed responses as JSON or server-sent events), ``auth.py``, ``limits.py`` and
``browser.py`` (middleware), ``body.py`` (request bodies), ``errors.py`` (error responses), ``openapi.py`` (the
contract), ``sse.py``, ``disconnect.py``. Other routes (the batch API) come in as a :class:`Mount` each.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.responses import Response

from .. import __version__
from ..engine.async_engine import AsyncEngine
from ..serving.chat import ChatServing
from ..serving.completion import CompletionServing
from ..serving.drain import OpenRequests
from ..serving.embedding import EmbeddingServing
from ..serving.embedding_protocol import EmbeddingRequest, EmbeddingResponse
from ..serving.errors import APIError, EngineUnavailable
from ..serving.inputs import context_limit
from ..serving.metrics import ServerMetrics
from ..serving.models import ModelServing
from ..serving.protocol import (
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
from ..serving.settings import ServerSettings
from .auth import APIKeyMiddleware
from .body import read_json
from .browser import install_browser_checks
from .disconnect import cancel_on_disconnect
from .errors import error_response, install_error_handlers
from .limits import BodySizeLimitMiddleware
from .openapi import GENERATION_ERRORS, JSON_BODY_ERRORS, RouteDocs, below_pattern, documented, install_openapi
from .replies import http_reply


class HealthResponse(BaseModel):
    status: str


@dataclass(frozen=True)
class Mount:
    """Routes from outside the server (the batch API), added by composition: the router (its lifespan runs inside
    the app's, after the engine starts), their OpenAPI documentation, and body size limits of their own (path ->
    bytes, instead of --max-body-bytes)."""

    router: APIRouter
    route_docs: RouteDocs = field(default_factory=dict)
    body_limits: Mapping[str, int] = field(default_factory=dict)


async def http_reply_of(result: Awaitable[BaseModel | AsyncIterator[BaseModel]]) -> Response:
    return await http_reply(await result)


def build_app(
    engine: AsyncEngine,
    settings: ServerSettings,
    shutdown_timeout: float = 5.0,
    metrics: ServerMetrics | None = None,
    mounts: Sequence[Mount] = (),
) -> FastAPI:
    """The server app. Its lifespan starts ``engine`` if needed and shuts it down (``shutdown_timeout`` s).
    ``metrics`` (one is made if None) is what ``/metrics`` reports; ``mounts`` adds routes from outside."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not engine.started:
            engine.start()
        yield
        await asyncio.to_thread(engine.shutdown, shutdown_timeout)

    app = FastAPI(title="falconlm", version=__version__, lifespan=lifespan)
    app.state.metrics = metrics = metrics or ServerMetrics(lambda: engine.stats)
    app.state.open_requests = open_requests = OpenRequests()
    completions = CompletionServing(engine, settings, metrics, open_requests)
    chat = ChatServing(engine, settings, metrics, open_requests)
    models = ModelServing(engine, settings)
    embeddings = EmbeddingServing(engine, settings, metrics, open_requests)
    install_error_handlers(app)
    body_limits = {path: limit for mount in mounts for path, limit in mount.body_limits.items()}
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes, path_limits=body_limits)
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

    @app.post("/v1/embeddings", **documented(EmbeddingRequest, EmbeddingResponse, errors=GENERATION_ERRORS))
    async def create_embedding(http_request: Request) -> Response:
        require_ready()
        request = await read_json(http_request, EmbeddingRequest, require_json_type)
        return await cancel_on_disconnect(http_request, http_reply_of(embeddings.create(request)))

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
            "dimensions": engine.engine.model.config.hidden_size,
        }

    route_docs: dict = {}
    for mount in mounts:
        app.include_router(mount.router)
        route_docs.update(mount.route_docs)
    install_openapi(app, limits, bearer=bool(settings.api_keys), route_docs=route_docs)
    return app
