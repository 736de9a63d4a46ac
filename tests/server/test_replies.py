"""Typed serving results over HTTP: a response object as JSON, chunks as server-sent events with an error event
for an APIError midway, and closing the event stream closes the chunks (which aborts their engine requests)."""

from __future__ import annotations

import asyncio
import json

from falconlm.server.replies import http_reply, sse_events
from falconlm.server.sse import EventStreamResponse
from falconlm.serving.errors import APIError, QueueFull
from falconlm.serving.protocol import UsageInfo


def usage(n: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=n, completion_tokens=1, total_tokens=n + 1)


async def _collect(events) -> list[str]:
    return [event async for event in events]


def test_a_response_object_is_sent_as_json():
    reply = asyncio.run(http_reply(usage(2)))
    assert reply.media_type == "application/json"
    assert json.loads(reply.body) == {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}


def test_chunks_then_an_error_midway_then_done():
    async def chunks():
        yield usage(1)
        yield usage(2)
        raise QueueFull("the server is busy", retry_after=1)

    reply = asyncio.run(http_reply(chunks()))
    assert isinstance(reply, EventStreamResponse)
    events = asyncio.run(_collect(sse_events(chunks())))
    assert [json.loads(e.removeprefix("data: "))["prompt_tokens"] for e in events[:2]] == [1, 2]
    error = json.loads(events[2].removeprefix("data: "))["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert error["message"] == "the server is busy"
    assert events[3:] == ["data: [DONE]\n\n"]


def test_closing_the_events_closes_the_chunks():
    closed = []

    async def chunks():
        try:
            while True:
                yield usage(1)
        finally:
            closed.append(True)

    async def read_one_then_close() -> None:
        events = sse_events(chunks())
        assert (await events.__anext__()).startswith("data: ")
        await events.aclose()

    asyncio.run(read_one_then_close())
    assert closed == [True]


def test_an_error_object_carries_type_code_and_status():
    error = APIError(404, "no such model", "model", "model_not_found")
    assert (error.error_type, error.error_code) == ("not_found_error", "model_not_found")
    assert error.to_dict()["error"] == {
        "message": "no such model",
        "type": "not_found_error",
        "param": "model",
        "code": "model_not_found",
    }
    assert APIError(500, "boom").error_code == "internal_error"
