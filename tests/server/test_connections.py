"""The hardened uvicorn of ``falconlm serve``: header read timeout, connection cap, open streams ended with an
error event and ``[DONE]`` when a shutdown runs out of time, and no API key from a query string in the log."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from falconlm.engine.async_engine import AsyncEngine
from falconlm.server import ServerSettings, build_app
from falconlm.server.uvicorn_server import (
    DrainingServer,
    RedactQueryKeys,
    guarded_protocol,
    install_access_log_redaction,
    redact_query,
)

from .conftest import MODEL_NAME, free_port, load_engine


class GuardedServer:
    """build_app served by DrainingServer with the guarded protocol, in a thread on 127.0.0.1."""

    def __init__(self, checkpoint: Path, step_delay: float = 0.0, drain_seconds: float = 30.0, **protocol) -> None:
        engine = load_engine(checkpoint)
        if step_delay:
            execute = engine.runner.execute

            def slow_execute(step):
                time.sleep(step_delay)
                return execute(step)

            engine.runner.execute = slow_execute
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = build_app(AsyncEngine(engine), ServerSettings(served_model_names=(MODEL_NAME,)))
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_config=None,  # leave logging alone: the access log reaches caplog
            log_level="info",
            http=guarded_protocol(**protocol),
            timeout_graceful_shutdown=drain_seconds + 5,
        )
        self.server = DrainingServer(config, app.state.open_requests, drain_seconds=drain_seconds)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> GuardedServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


@pytest.fixture
def connect() -> Iterator:
    sockets: list[socket.socket] = []

    def open_socket(port: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        sockets.append(sock)
        return sock

    yield open_socket
    for sock in sockets:
        sock.close()


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_half_open_connection_gets_408_and_is_closed(tiny_checkpoint, connect):
    with GuardedServer(tiny_checkpoint, header_timeout=0.5) as served:
        sock = connect(served.port)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # and never the rest
        reply = _read_all(sock)
        assert reply.startswith(b"HTTP/1.1 408 ")
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
        silent = connect(served.port)  # says nothing at all: closed without a word
        assert _read_all(silent) == b""
        assert httpx.get(f"{served.url}/health", timeout=20).status_code == 200


def test_connections_over_max_connections_are_closed(tiny_checkpoint, connect):
    with GuardedServer(tiny_checkpoint, max_connections=2) as served:
        first, second = connect(served.port), connect(served.port)
        time.sleep(0.2)  # let the server accept both before the third arrives
        third = connect(served.port)
        assert _read_all(third) == b""
        for sock in (first, second):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert _read_all(sock).startswith(b"HTTP/1.1 200 ")


def test_shutdown_past_timeout_ends_open_stream_with_error_event_then_done(tiny_checkpoint):
    body = {"model": MODEL_NAME, "prompt": "Once", "max_tokens": 120, "ignore_eos": True, "stream": True}
    with GuardedServer(tiny_checkpoint, step_delay=0.05, drain_seconds=0.3) as served:
        events: list[str] = []
        with (
            httpx.Client(base_url=served.url, timeout=60) as http,
            http.stream("POST", "/v1/completions", json=body) as r,
        ):
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[len("data: ") :])
                if len(events) == 1:
                    served.server.should_exit = True  # SIGTERM, as far as uvicorn is concerned
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "service_unavailable_error" and "shutting down" in error["message"]
    assert len(events) < 120  # it did not run to the end


def test_api_key_in_query_string_is_redacted_in_access_log(tiny_checkpoint, caplog):
    install_access_log_redaction()
    with GuardedServer(tiny_checkpoint) as served, caplog.at_level(logging.INFO, logger="uvicorn.access"):
        assert httpx.get(f"{served.url}/health?api_key=sk-secret-1&x=1", timeout=20).status_code == 200
        assert httpx.get(f"{served.url}/health?token=sk-secret-2", timeout=20).status_code == 200
        time.sleep(0.1)  # the access line is logged after the response is sent
    logged = "\n".join(record.getMessage() for record in caplog.records if record.name == "uvicorn.access")
    assert "/health?api_key=REDACTED&x=1" in logged and "token=REDACTED" in logged
    assert "sk-secret" not in logged


@pytest.mark.parametrize(
    ("path", "redacted"),
    [
        ("/v1/models?api_key=abc", "/v1/models?api_key=REDACTED"),
        ("/v1/models?x=1&API-KEY=abc&y=2", "/v1/models?x=1&API-KEY=REDACTED&y=2"),
        ("/v1/models?access_token=abc", "/v1/models?access_token=REDACTED"),
        ("/v1/models?monkey=1", "/v1/models?monkey=1"),
        ("/v1/models", "/v1/models"),
    ],
)
def test_redact_query_hides_key_like_parameters_only(path, redacted):
    assert redact_query(path) == redacted
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s"', ("c", "GET", path), None)
    RedactQueryKeys().filter(record)
    assert record.getMessage() == f'c - "GET {redacted}"'
