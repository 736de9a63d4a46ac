"""ChatServing with a scripted generation: a reply that does call tools becomes ``tool_calls`` (whole) and the
same calls as streamed deltas, whatever the token boundaries; the tiny model on the live server rarely calls
one, so the path is driven here with fixed text."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from falconlm.serving.chat import ChatServing
from falconlm.serving.generation import Choice
from falconlm.serving.protocol import ChatCompletionRequest
from falconlm.serving.settings import ServerSettings
from falconlm.serving.tools import plan_tools

TOOLS = [
    {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {"name": "get_weather"}},
]
REPLY = (
    'Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
    '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
)


class ScriptedGeneration:
    """Stands in for ``Generation``: one choice whose text arrives in the given pieces, then finishes."""

    def __init__(self, pieces: list[str], finish_reason: str = "stop") -> None:
        self.stream = object()
        self.pieces = pieces
        self.finish = finish_reason
        self.choices = [Choice(0, 0, "r-0", timer=None)]

    async def outputs(self):
        choice = self.choices[0]
        for i, text in enumerate(self.pieces):
            last = i == len(self.pieces) - 1
            choice.text += text
            if last:
                choice.finish_reason = self.finish
            yield choice, SimpleNamespace(text=text, token_ids=[1], finished=last)

    def abort(self) -> None:
        pass


def _serving() -> ChatServing:
    return ChatServing(None, ServerSettings(served_model_names=("m",)), None)  # type: ignore[arg-type]


def _request(**extra) -> ChatCompletionRequest:
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, "stream": True, **extra}
    return ChatCompletionRequest.model_validate(body)


async def _collect(serving: ChatServing, request: ChatCompletionRequest, generation: ScriptedGeneration) -> list:
    return [chunk async for chunk in serving._stream(request, generation, "chatcmpl-x", plan_tools(request))]


def _accumulate(chunks) -> tuple[str, list[tuple[str, dict]], str | None]:
    content, calls, finish = "", {}, None
    for chunk in chunks:
        (choice,) = chunk.choices
        content += choice.delta.content or ""
        for piece in choice.delta.tool_calls or []:
            call = calls.setdefault(piece.index, {"name": None, "arguments": ""})
            if piece.id is not None:
                assert piece.id.startswith("call_") and piece.type == "function"
                call["name"] = piece.function.name
            call["arguments"] += piece.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())], finish


@pytest.mark.parametrize("size", [1, 2, 5, 11, len(REPLY)])
def test_streamed_calls_equal_the_whole_reply(size: int):
    serving, request = _serving(), _request()
    whole = ScriptedGeneration([REPLY])
    asyncio.run(_collect(serving, request, whole))  # runs the choice to its end
    reply = serving._choice(request, whole.choices[0], plan_tools(request))
    assert reply.finish_reason == "tool_calls" and reply.message.content == "Let me check."
    expected = [(c.function.name, json.loads(c.function.arguments)) for c in reply.message.tool_calls]
    assert expected == [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    assert len({c.id for c in reply.message.tool_calls}) == 2

    pieces = [REPLY[i : i + size] for i in range(0, len(REPLY), size)]
    chunks = asyncio.run(_collect(serving, request, ScriptedGeneration(pieces)))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert _accumulate(chunks) == ("Let me check.", expected, "tool_calls")
    body = [json.loads(c.model_dump_json()) for c in chunks]
    assert all("<tool_call" not in (b["choices"][0]["delta"].get("content") or "") for b in body)
    assert all("tool_calls" not in b["choices"][0]["delta"] for b in body if b["choices"][0]["delta"].get("content"))


def test_no_call_keeps_content_and_finish_reason():
    serving, request = _serving(), _request()
    generation = ScriptedGeneration(["Just ", "words <", "3"], finish_reason="length")
    content, calls, finish = _accumulate(asyncio.run(_collect(serving, request, generation)))
    assert (content, calls, finish) == ("Just words <3", [], "length")
    reply = serving._choice(request, generation.choices[0], plan_tools(request))
    assert reply.message.content == "Just words <3" and reply.message.tool_calls is None
    assert "tool_calls" not in json.loads(reply.model_dump_json())["message"]


def test_tool_choice_none_leaves_markup_as_content():
    serving, request = _serving(), _request(tool_choice="none")
    content, calls, finish = _accumulate(asyncio.run(_collect(serving, request, ScriptedGeneration([REPLY]))))
    assert (content, calls, finish) == (REPLY, [], "stop")


def test_named_choice_streams_the_arguments_as_they_come():
    serving = _serving()
    request = _request(tool_choice={"type": "function", "function": {"name": "add"}})
    pieces = ['{"a"', ": 1, ", '"b": 2}']
    chunks = asyncio.run(_collect(serving, request, ScriptedGeneration(pieces)))
    fragments = [c.choices[0].delta.tool_calls[0].function.arguments for c in chunks if c.choices[0].delta.tool_calls]
    assert fragments == ["", *pieces]
    assert _accumulate(chunks) == ("", [("add", {"a": 1, "b": 2})], "tool_calls")
