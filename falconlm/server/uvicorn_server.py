"""uvicorn, hardened for ``falconlm serve``: a header read timeout, a connection cap, a shutdown that ends open
responses with an error, and an access log without API keys.

- :func:`guarded_protocol`: uvicorn's h11 protocol that answers 408 and closes a connection whose request line
  and headers have not all arrived ``header_timeout`` seconds after its first byte (or after it opened), and
  closes new connections over ``max_connections`` at once. Half-open connections can no longer pile up.
- :class:`DrainingServer`: on shutdown, once ``--shutdown-timeout`` passes, every open response is ended with
  an error (an error event then ``[DONE]`` for a stream, see ``drain.py``) before uvicorn cancels what is left.
- :class:`RedactQueryKeys`: a logging filter that replaces the values of ``api_key``-like query parameters
  in uvicorn's access log with ``REDACTED``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..serving.drain import OpenRequests
from ..serving.errors import error_body

logger = logging.getLogger("falconlm.serve")

DEFAULT_HEADER_TIMEOUT = 30.0
DRAIN_GRACE_SECONDS = 2.0  # after the error events: time for the responses to finish before uvicorn cancels


def _timeout_response() -> bytes:
    body = json.dumps(error_body(408, "the request headers did not arrive in time")).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


class _GuardedH11Protocol(H11Protocol):
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    max_connections: int | None = None
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            logger.warning("closing a new connection: the limit of %d is reached", self.max_connections)
            self.connections.discard(self)
            transport.close()
            return
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self._awaiting_headers():
            self._arm_header_timer()
        super().data_received(data)
        if self._header_timer is not None and not self._awaiting_headers():
            self._header_timer.cancel()
            self._header_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def _awaiting_headers(self) -> bool:
        return self.conn.their_state is h11.IDLE and not self.transport.is_closing()

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._on_header_timeout)

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if not self._awaiting_headers():
            return
        if self.conn.trailing_data[0]:  # part of a request arrived: say why the connection closes
            self.transport.write(_timeout_response())
        self.transport.close()


def guarded_protocol(header_timeout: float = DEFAULT_HEADER_TIMEOUT, max_connections: int | None = None) -> type:
    """An h11 protocol class for ``uvicorn.Config(http=...)`` with these limits."""
    if header_timeout <= 0:
        raise ValueError(f"the header timeout must be > 0 seconds, got {header_timeout:g}")
    if max_connections is not None and max_connections < 1:
        raise ValueError(f"--max-connections must be >= 1, got {max_connections}")
    attributes = {"header_timeout": header_timeout, "max_connections": max_connections}
    return type("GuardedH11Protocol", (_GuardedH11Protocol,), attributes)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose shutdown ends the open responses with an error after ``drain_seconds``."""

    def __init__(self, config: uvicorn.Config, open_requests: OpenRequests, drain_seconds: float) -> None:
        super().__init__(config)
        self.open_requests = open_requests
        self.drain_seconds = drain_seconds

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.drain_seconds, self._expire)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    def _expire(self) -> None:
        count = self.open_requests.expire()
        if count:
            logger.warning("shutdown timeout: ended %d open request(s) with an error", count)


_SECRET_PARAMS = re.compile(r"(?i)((?:^|[?&])(?:api[-_]?key|key|token|access[-_]?token|auth|authorization)=)[^&]*")


def redact_query(path: str) -> str:
    """``path`` with the values of key-like query parameters replaced by REDACTED."""
    return _SECRET_PARAMS.sub(r"\1REDACTED", path) if "?" in path else path


class RedactQueryKeys(logging.Filter):
    """Redacts key-like query parameters in uvicorn access-log records (args: client, method, path, ...)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], redact_query(args[2]), *args[3:])
        return True


def install_access_log_redaction() -> None:
    """Add :class:`RedactQueryKeys` to uvicorn's access logger (once)."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactQueryKeys) for f in access.filters):
        access.addFilter(RedactQueryKeys())
