"""What the serving layer returns, as HTTP: a response object as JSON, a chunk stream as server-sent events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from pydantic import BaseModel
from starlette.responses import Response

from ..serving.errors import APIError
from .sse import SSE_DONE, EventStreamResponse, sse_event


async def http_reply(result: BaseModel | AsyncIterator[BaseModel]) -> Response:
    """A JSON response (serialised on a worker thread: a reply with many choices and logprobs takes a while to
    encode, and the event loop keeps answering other requests meanwhile), or an event stream of chunks."""
    if isinstance(result, BaseModel):
        body = await asyncio.to_thread(lambda: result.model_dump_json().encode("utf-8"))
        return Response(body, media_type="application/json")
    return EventStreamResponse(sse_events(result))


async def sse_events(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    """Each chunk as an event; an APIError midway becomes an error event; then ``[DONE]``. Closing this closes
    ``chunks`` (which aborts their engine requests)."""
    try:
        try:
            async for chunk in chunks:
                yield sse_event(chunk)
        except APIError as exc:
            yield sse_event(exc.to_dict())
        yield SSE_DONE
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
