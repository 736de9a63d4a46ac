"""The requests in flight, so that a shutdown that runs out of time can end each one with an error.

Without this, uvicorn cancels what is left when ``--shutdown-timeout`` passes and a streaming client sees the
connection drop mid-stream, with no error event and no ``[DONE]``. :meth:`OpenRequests.expire` instead fails
every open request's stream with EngineStoppedError: streams send an error event then ``[DONE]``, waiting
requests get a 503 error object.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..engine.async_engine import EngineStoppedError, RequestStream


class OpenRequests:
    """The engine request streams of the responses being produced (added and removed on the event loop)."""

    def __init__(self) -> None:
        self._streams: set[RequestStream] = set()

    def __len__(self) -> int:
        return len(self._streams)

    @contextmanager
    def track(self, stream: RequestStream) -> Iterator[RequestStream]:
        self._streams.add(stream)
        try:
            yield stream
        finally:
            self._streams.discard(stream)

    def expire(self, reason: str = "the server shut down before this request finished") -> int:
        """End every open request with an error; returns how many there were. Call on the event loop."""
        streams = list(self._streams)
        for stream in streams:
            stream.fail(EngineStoppedError(reason))
        return len(streams)
