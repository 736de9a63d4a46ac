"""The front end of ``serve --ray-replicas``: one OpenAI endpoint over several complete falconlm servers.

Every route except ``/health`` and ``/metrics`` is passed through to a replica unchanged (status, headers, body,
server-sent events as they arrive), so each endpoint, stream and error object is the single server's own. The
front adds:

- the checks a client meets first: API keys (constant time, every route but ``/health``), body size limits, the
  Host/Origin/CORS checks and, without keys, the JSON Content-Type check. The replicas take a key of their own
  that only the front holds;
- routing: prefix-aware, see ``replica_routing``; the replica that answered is named in ``x-falconlm-replica``.
  A replica that refuses the connection is taken out of routing and the request goes to the next one; a replica
  that fails mid-answer gives a 502 error object (or, mid-stream, an error event and ``[DONE]``);
- ``/v1/files`` and ``/v1/batches`` go to replica 0 only: the batch jobs and their state directory live there;
- ``/health``: 200 with the number of ready replicas while at least one is ready, else a 503 error object;
- ``/metrics``: per-replica routed, in-flight and ready series, then every replica's own metrics with a
  ``replica`` label.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Metric, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from .. import __version__
from ..serving.errors import APIError, error_body
from .auth import APIKeyMiddleware
from .body import is_json_type
from .browser import install_browser_checks
from .disconnect import cancel_on_disconnect
from .errors import error_response, install_error_handlers
from .limits import BodySizeLimitMiddleware
from .replica_pool import Replica, ReplicaPool
from .replica_routing import PREFIX_CHARS, prefix_key
from .sse import SSE_DONE, EventStreamResponse

logger = logging.getLogger("falconlm.serve")

REPLICA_HEADER = "x-falconlm-replica"
BATCH_PREFIXES = ("/v1/files", "/v1/batches")
JSON_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize", "/detokenize"})
BUFFERED_BYTES = 8 << 20  # answers up to this size (with a Content-Length) are read whole, larger ones streamed
# Connection and request headers that concern one hop (RFC 9110 §7.6.1), and those the front answers itself.
_HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding",
     "upgrade", "content-length", "host"}
)  # fmt: skip
# The connection broke before any answer came: the replica went away (or a kept-alive connection to it went stale).
RETRIED_ERRORS = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)
_CLIENT_ONLY_HEADERS = frozenset({"authorization", "origin", "referer", "cookie"})


@dataclass(frozen=True)
class FrontSettings:
    """``api_keys``: what clients must send (none: open); ``replica_key``: what the front sends the replicas."""

    replica_key: str
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    max_upload_bytes: int = 200 * 1024 * 1024
    bind_host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    retry_after_seconds: int = 1
    prefix_chars: int = PREFIX_CHARS  # how much of a prompt's start decides its replica (see replica_routing)
    read_timeout: float = 600.0  # seconds a replica may stay silent mid-answer before the request fails


def _unavailable(message: str, settings: FrontSettings) -> APIError:
    return APIError(503, message, headers={"Retry-After": str(settings.retry_after_seconds)})


class _ProxyStream(EventStreamResponse):
    """A streamed answer from a replica, passed on chunk by chunk; closed when the client goes away.
    ``close`` (idempotent) runs at the end even when the stream never started."""

    media_type = None  # the replica's Content-Type, whatever it is

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        status_code: int,
        headers: dict[str, str],
        close: Callable[[], Awaitable[None]],
    ) -> None:
        StreamingResponse.__init__(self, chunks, status_code=status_code, headers=headers)
        self._events = chunks
        self._close = close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._close()


def _request_headers(request: Request, settings: FrontSettings) -> dict[str, str]:
    skip = _HOP_HEADERS | _CLIENT_ONLY_HEADERS
    headers = {name: value for name, value in request.headers.items() if name.lower() not in skip}
    headers["authorization"] = f"Bearer {settings.replica_key}"
    return headers


def _response_headers(upstream: httpx.Response, replica: Replica) -> dict[str, str]:
    headers = {name: value for name, value in upstream.headers.items() if name.lower() not in _HOP_HEADERS}
    headers[REPLICA_HEADER] = str(replica.index)
    return headers


def _relabelled(texts: dict[int, str]) -> list[Metric]:
    """The replicas' metric families (``replica`` -> Prometheus text), merged, each sample labelled."""
    families: dict[str, Metric] = {}
    for index, text in sorted(texts.items()):
        try:
            parsed = list(text_string_to_metric_families(text))
        except ValueError:
            continue
        for family in parsed:
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for sample in family.samples:
                labels = {**sample.labels, "replica": str(index)}
                merged.samples.append(Sample(sample.name, labels, sample.value, sample.timestamp, sample.exemplar))
    return list(families.values())


class _Static:
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> list[Metric]:
        return self.metrics


def _pool_metrics(pool: ReplicaPool) -> list[Metric]:
    routed = Metric("falconlm_replica_routed_requests", "Requests the front sent to each replica.", "counter")
    in_flight = Metric("falconlm_replica_in_flight_requests", "Requests each replica is answering now.", "gauge")
    ready = Metric("falconlm_replica_ready", "1 while the replica is in the routing, else 0.", "gauge")
    for replica in pool.replicas:
        label = {"replica": str(replica.index)}
        routed.add_sample("falconlm_replica_routed_requests_total", label, replica.routed)
        in_flight.add_sample("falconlm_replica_in_flight_requests", label, replica.in_flight)
        ready.add_sample("falconlm_replica_ready", label, float(replica.ready))
    return [routed, in_flight, ready]


def build_front_app(pool: ReplicaPool, settings: FrontSettings) -> FastAPI:
    """The front app over ``pool``; its lifespan runs the health checks."""
    client_box: list[httpx.AsyncClient] = []

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        timeout = httpx.Timeout(10.0, read=settings.read_timeout)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
            client_box.append(client)
            pool.headers = {"authorization": f"Bearer {settings.replica_key}"}
            health = asyncio.create_task(pool.run(client))
            try:
                yield
            finally:
                health.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await health

    app = FastAPI(
        title="falconlm", version=__version__, lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None
    )
    install_error_handlers(app)
    upload_limits = {"/v1/files": settings.max_upload_bytes}
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes, path_limits=upload_limits)
    app.add_middleware(APIKeyMiddleware, api_keys=settings.api_keys)
    install_browser_checks(app, settings.bind_host, settings.allowed_hosts, settings.allowed_origins)

    @app.get("/health", include_in_schema=False)
    async def health() -> Response:
        ready, total = len(pool.ready), len(pool.replicas)
        if not ready:
            return error_response(_unavailable(f"no replica is ready (0 of {total})", settings))
        return JSONResponse({"status": "ok", "replicas_ready": ready, "replicas": total})

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        client = client_box[0]

        async def scrape(replica: Replica) -> tuple[int, str | None]:
            try:
                answer = await client.get(f"{replica.url}/metrics", headers=pool.headers, timeout=5.0)
            except httpx.TransportError:
                return replica.index, None
            return replica.index, answer.text if answer.status_code == 200 else None

        scraped = await asyncio.gather(*(scrape(replica) for replica in pool.ready))
        registry = CollectorRegistry()
        registry.register(_Static(_pool_metrics(pool) + _relabelled({i: t for i, t in scraped if t is not None})))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.api_route("/{path:path}", methods=["GET", "POST", "DELETE", "PUT", "PATCH"], include_in_schema=False)
    async def forward(request: Request) -> Response:
        path = request.url.path
        if request.method == "POST" and path in JSON_ROUTES and not settings.api_keys:
            content_type = request.headers.get("content-type")
            if not is_json_type(content_type):  # as the single server does without keys (see body.py)
                raise APIError(
                    415,
                    "send the body as JSON with 'Content-Type: application/json' "
                    f"(got {content_type or 'no Content-Type'})",
                    code="unsupported_media_type",
                )
        if path.startswith(BATCH_PREFIXES):
            return await _forward_batch(request)
        body = await request.body()
        return await cancel_on_disconnect(
            request, _forward_routed(request, body, prefix_key(path, body, settings.prefix_chars))
        )

    async def _forward_batch(request: Request) -> Response:
        replica = pool.replicas[0]
        if not (replica.ready and replica.url):
            raise _unavailable("the batch API runs on replica 0, which is not ready", settings)
        replica.in_flight += 1
        replica.routed += 1
        try:
            upstream = await _send(replica, request, request.stream())
        except httpx.ConnectError as exc:
            pool.release(replica)
            pool.mark_down(replica, f"connection refused ({exc})")
            raise _unavailable("the batch API runs on replica 0, which is not reachable", settings) from None
        except httpx.TransportError as exc:  # the upload is spent: no second try
            pool.release(replica)
            pool.suspect(replica)
            raise _replica_failed(replica, exc) from None
        except BaseException:
            pool.release(replica)
            raise
        return await _answer(replica, upstream)

    async def _forward_routed(request: Request, body: bytes, key: bytes | None) -> Response:
        """Send to the replica for ``key``; one whose connection is refused or drops before any answer (a dead
        process, a stale kept-alive connection) leaves the routing and the next one is tried. These routes have
        no side effects, so sending again is safe."""
        tried: set[int] = set()
        failure: Exception | None = None
        while True:
            replica = pool.pick(key, exclude=tried)
            if replica is None:
                if failure is not None:
                    raise failure
                total = len(pool.replicas)
                raise _unavailable(f"no replica is ready ({len(pool.ready)} of {total})", settings)
            try:
                upstream = await _send(replica, request, body)
            except httpx.ConnectError as exc:
                pool.release(replica)
                pool.mark_down(replica, f"connection refused ({exc})")
                tried.add(replica.index)
                continue
            except RETRIED_ERRORS as exc:
                pool.release(replica)
                pool.suspect(replica)
                tried.add(replica.index)
                failure = _replica_failed(replica, exc)
                continue
            except httpx.TransportError as exc:  # a timeout: the replica is slow or hung, not gone
                pool.release(replica)
                pool.suspect(replica)
                raise _replica_failed(replica, exc) from None
            except BaseException:
                pool.release(replica)
                raise
            return await _answer(replica, upstream)

    async def _send(replica: Replica, request: Request, content) -> httpx.Response:
        """The replica's response with its headers read (the caller owns it)."""
        client = client_box[0]
        raw_path = request.scope.get("raw_path")  # as the client encoded it (a model id may hold %2F)
        path = raw_path.decode("latin-1") if raw_path else request.url.path
        url = httpx.URL(f"{replica.url}{path}", query=request.url.query.encode("latin-1"))
        outgoing = client.build_request(
            request.method, url, headers=_request_headers(request, settings), content=content
        )
        return await client.send(outgoing, stream=True)

    async def _answer(replica: Replica, upstream: httpx.Response) -> Response:
        """The client's response for ``upstream``: read whole when small, else streamed; releases the replica."""
        headers = _response_headers(upstream, replica)
        length = upstream.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) <= BUFFERED_BYTES:
            try:
                content = await upstream.aread()
            except httpx.TransportError as exc:
                pool.suspect(replica)
                raise _replica_failed(replica, exc) from None
            finally:
                await upstream.aclose()
                pool.release(replica)
            return Response(content, status_code=upstream.status_code, headers=headers)
        closed = False

        async def close() -> None:
            nonlocal closed
            if not closed:
                closed = True
                await upstream.aclose()
                pool.release(replica)

        return _ProxyStream(_chunks(replica, upstream, close), upstream.status_code, headers, close)

    async def _chunks(
        replica: Replica, upstream: httpx.Response, close: Callable[[], Awaitable[None]]
    ) -> AsyncIterator[bytes]:
        is_events = upstream.headers.get("content-type", "").startswith("text/event-stream")
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx.TransportError as exc:
            pool.suspect(replica)
            logger.warning("replica %d failed mid-stream: %s", replica.index, type(exc).__name__)
            if is_events:
                error = _replica_failed(replica, exc)
                yield f"data: {json.dumps(error_body(error.status_code, error.message))}\n\n{SSE_DONE}".encode()
        finally:
            await close()

    return app


def _replica_failed(replica: Replica, exc: Exception) -> APIError:
    return APIError(502, f"replica {replica.index} failed while answering ({type(exc).__name__}); retry the request")
