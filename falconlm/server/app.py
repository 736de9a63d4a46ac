"""``build_app(engine, settings)``: the FastAPI routes of the OpenAI-compatible server, and nothing else.

The work behind each route lives beside this file: ``serving_*.py`` (requests to engine calls to responses),
``auth.py`` and ``limits.py`` (middleware), ``errors.py`` (error objects), ``metrics.py``, ``sse.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from .. import __version__
from ..engine.async_engine import AsyncEngine
from .auth import APIKeyMiddleware
from .body import read_json
from .disconnect import cancel_on_disconnect
from .errors import APIError, error_response, install_error_handlers
from .limits import BodySizeLimitMiddleware
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .serving_chat import ChatServing
from .serving_completion import CompletionServing
from .serving_models import ModelServing
from .settings import ServerSettings


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
    completions = CompletionServing(engine, settings, metrics)
    chat = ChatServing(engine, settings, metrics)
    models = ModelServing(engine, settings)
    install_error_handlers(app)
    uploads = ("/v1/files",) if settings.state_dir is not None else ()  # the batch router limits its own uploads
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes, exempt_paths=uploads)
    app.add_middleware(APIKeyMiddleware, api_keys=settings.api_keys)  # outermost: no key, no body read

    def require_ready() -> None:
        if not engine.is_ready:
            retry = {"Retry-After": str(settings.retry_after_seconds)}
            if engine.load_error is not None:
                raise APIError(503, f"the model failed to load: {engine.load_error}", headers=retry)
            message = "the model is still loading" if engine.is_loading else "the server is not running"
            raise APIError(503, message, headers=retry)

    @app.get("/health")
    async def health() -> Response:
        try:
            require_ready()
        except APIError as exc:
            return error_response(exc)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def list_models() -> Response:
        return JSONResponse(models.models().model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        return JSONResponse(models.model(model_id).model_dump())

    @app.post("/v1/completions")
    async def create_completion(http_request: Request) -> Response:
        require_ready()
        request = await read_json(http_request, CompletionRequest)
        return await cancel_on_disconnect(http_request, completions.create(request))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(http_request: Request) -> Response:
        require_ready()
        request = await read_json(http_request, ChatCompletionRequest)
        return await cancel_on_disconnect(http_request, chat.create(request))

    @app.post("/tokenize")
    async def tokenize(http_request: Request) -> Response:
        require_ready()
        request = await read_json(http_request, TokenizeRequest)
        return JSONResponse(models.tokenize(request).model_dump())

    @app.post("/detokenize")
    async def detokenize(http_request: Request) -> Response:
        require_ready()
        request = await read_json(http_request, DetokenizeRequest)
        return JSONResponse(models.detokenize(request).model_dump())

    if settings.state_dir is not None:
        from ..batch.routes import BatchService, mount_batches

        mount_batches(app, BatchService(settings.state_dir, engine, settings, metrics, settings.max_upload_bytes))
    return app
