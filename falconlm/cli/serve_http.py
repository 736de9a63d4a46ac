"""``falconlm serve``'s HTTP side: its options (who may call the server, connection and reply limits), the app
(server routes plus, with a state directory, the batch routes) and the uvicorn server that runs it."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .options import positive_int

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ..engine.async_engine import AsyncEngine
    from ..serving.settings import ServerSettings


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"expected seconds in (0, 3600], got {text!r}")
    return value


def add_http_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allowed-hosts",
        type=_names,
        default=(),
        metavar="NAMES",
        help="extra Host names the server answers, comma-separated ('*.example.org' patterns, '*' for any); "
        "by default only the bound address (and localhost names when bound to loopback)",
    )
    p.add_argument(
        "--allowed-origins",
        type=_names,
        default=(),
        metavar="ORIGINS",
        help="web front ends whose pages may call the API (CORS), comma-separated like https://chat.example.org; "
        "requests from other web pages get 403",
    )
    p.add_argument(
        "--max-connections",
        type=positive_int,
        default=1024,
        help="open connections; more are closed at once (default 1024)",
    )
    p.add_argument(
        "--header-timeout",
        type=positive_seconds,
        default=30.0,
        metavar="SECONDS",
        help="time for a request's headers to arrive before 408 and close (default 30)",
    )
    p.add_argument(
        "--max-choices", type=positive_int, default=16, help="n, and prompts in one request, at most (default 16)"
    )
    p.add_argument(
        "--max-logprobs", type=int, default=20, help="top logprobs per token a request may ask for, 0-20 (default 20)"
    )


def check_api_keys(keys: tuple[str, ...]) -> None:
    """A key the Authorization header cannot carry (non-ASCII or control characters) could never match."""
    for key in keys:
        if not key.isascii() or not key.isprintable():
            raise ValueError("API keys must be printable ASCII (an HTTP header cannot carry other characters)")


def http_settings(args: argparse.Namespace) -> dict:
    """The ServerSettings fields these options set."""
    if not 0 <= args.max_logprobs <= 20:
        raise ValueError(f"--max-logprobs must be in [0, 20], got {args.max_logprobs}")
    return {
        "bind_host": args.host,
        "allowed_hosts": args.allowed_hosts,
        "allowed_origins": args.allowed_origins,
        "max_choices": args.max_choices,
        "max_logprobs": args.max_logprobs,
    }


def uvicorn_config(app, args: argparse.Namespace):
    """uvicorn's settings for ``app`` from the HTTP options: guarded connections, and a graceful shutdown that
    gives open responses ``--shutdown-timeout`` (plus a grace), and the keyless access log."""
    import uvicorn

    from ..server.uvicorn_server import DRAIN_GRACE_SECONDS, guarded_protocol, install_access_log_redaction

    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        http=guarded_protocol(args.header_timeout, args.max_connections),
        timeout_graceful_shutdown=args.shutdown_timeout + DRAIN_GRACE_SECONDS,
    )
    install_access_log_redaction()  # after the Config: it sets up uvicorn's logging
    return config


def uvicorn_server(app, args: argparse.Namespace):
    """The uvicorn server for ``app`` (:func:`uvicorn_config`), with a shutdown that ends open responses with an
    error once ``--shutdown-timeout`` passes."""
    from ..server.uvicorn_server import DrainingServer

    return DrainingServer(uvicorn_config(app, args), app.state.open_requests, drain_seconds=args.shutdown_timeout)


def build_server_app(engine: AsyncEngine, settings: ServerSettings, shutdown_timeout: float = 5.0) -> FastAPI:
    """The server app over ``engine``; with ``settings.state_dir`` the batch API (``/v1/files``, ``/v1/batches``)
    is mounted too, counting its requests in the same ``/metrics``. Server and batch know nothing of each other:
    they meet here."""
    from ..server import Mount, build_app
    from ..serving.metrics import ServerMetrics

    metrics = ServerMetrics(lambda: engine.stats)
    mounts = []
    if settings.state_dir is not None:
        from ..batch.protocol import BATCH_ROUTES
        from ..batch.routes import build_batch_router, upload_body_limit
        from ..batch.service import BatchService

        service = BatchService(settings.state_dir, engine, settings, metrics, settings.max_upload_bytes)
        upload_limit = {"/v1/files": upload_body_limit(settings.max_upload_bytes)}
        mounts.append(Mount(build_batch_router(service), BATCH_ROUTES, body_limits=upload_limit))
    return build_app(engine, settings, shutdown_timeout, metrics, mounts)
