"""Stop work for a client that went away before its (non-streaming) response was ready.

Streaming responses watch for the disconnect themselves (``sse.EventStreamResponse``); this covers the wait
before a response exists, so an abandoned request (a client timeout) does not keep generating.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from starlette.requests import Request
from starlette.responses import Response

CLIENT_CLOSED_REQUEST = 499  # nginx's status for "client closed the request"; nobody reads it


async def cancel_on_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Await ``work`` (the body is already read); cancel it if the client disconnects first.

    Cancelling runs the work's ``finally`` blocks, which abort its engine requests.
    """
    task = asyncio.ensure_future(work)
    disconnected = False

    async def watch() -> None:
        nonlocal disconnected
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                disconnected = True
                task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if disconnected:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        raise
    finally:
        watcher.cancel()
