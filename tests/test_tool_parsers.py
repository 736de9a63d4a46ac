"""Tool calls out of generated text: each supported format, text around calls, malformed calls left as content,
and the stream parser fed in any split agreeing with the whole text."""

from __future__ import annotations

import json

import pytest

from falconlm.serving.protocol import DeltaToolCall
from falconlm.serving.tool_parsers import ParsedCall, ToolCallParser, parse_forced, parse_tool_calls, split_pieces
from falconlm.serving.tool_stream import ToolDeltas, reply_message
from falconlm.serving.tools import ToolPlan

NAMES = ("get_weather", "add")
WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
ADD = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
PARIS = ParsedCall("get_weather", '{"city": "Paris"}')
ONE_TWO = ParsedCall("add", '{"a": 1, "b": 2}')

CASES = [
    ("Hello there.", "Hello there.", []),
    (f"<tool_call>{WEATHER}</tool_call>", None, [PARIS]),
    (f"<tool_call>\n{WEATHER}\n</tool_call>", None, [PARIS]),
    (f"Let me look.\n<tool_call>{WEATHER}</tool_call>", "Let me look.", [PARIS]),
    (f"<tool_call>{WEATHER}</tool_call>\n<tool_call>{ADD}</tool_call>", None, [PARIS, ONE_TWO]),
    (f"<tool_call>\n[{WEATHER}, {ADD}]\n</tool_call>", None, [PARIS, ONE_TWO]),  # Falcon3-Instruct's list
    (f"<tool_call>{WEATHER}", None, [PARIS]),  # stopped before the closing tag
    (f"  {WEATHER}", None, [PARIS]),  # plain JSON
    (f"[{WEATHER}, {ADD}]", None, [PARIS, ONE_TWO]),
    ('{"name": "add", "parameters": "{\\"a\\": 1, \\"b\\": 2}"}', None, [ONE_TWO]),  # parameters, as a string
    (f"<tool_call>{WEATHER}</tool_call> and then some", "and then some", [PARIS]),
    # malformed or unknown: the text stays content
    ('<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>', None, []),
    ('<tool_call>{"name": "launch", "arguments": {}}</tool_call>', None, []),
    ('<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>', None, []),
    ("<tool_call>[]</tool_call>", None, []),
    ("<tool_call>not json", None, []),
    ('{"answer": 42}', None, []),
    ("[1, 2, 3]", None, []),
    ("a < b and <tool", None, []),
    ("ends with <tool_call", None, []),
    ("   ", None, []),
]


def _expected_content(text: str, content: str | None, calls: list[ParsedCall]) -> str | None:
    return content if (content is not None or calls) else (text or None)


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_whole_text(text: str, content: str | None, calls: list[ParsedCall]):
    assert parse_tool_calls(text, NAMES) == (_expected_content(text, content, calls), calls)


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_stream_split_anywhere_gives_the_whole_text_result(text: str, content, calls):
    whole = parse_tool_calls(text, NAMES)
    for cut in range(len(text) + 1):  # two pieces, cut at every character boundary
        parser = ToolCallParser(NAMES)
        pieces = [*parser.feed(text[:cut]), *parser.feed(text[cut:]), *parser.finish()]
        assert split_pieces(pieces) == whole, cut
    parser = ToolCallParser(NAMES)  # one character at a time
    pieces = [piece for ch in text for piece in parser.feed(ch)] + parser.finish()
    assert split_pieces(pieces) == whole


def test_markup_never_reaches_content_while_streaming():
    text = f"Checking.<tool_call>{WEATHER}</tool_call>"
    parser = ToolCallParser(NAMES)
    streamed = []
    for ch in text:
        streamed += [p for p in parser.feed(ch) if isinstance(p, str)]
    assert "".join(streamed) == "Checking."
    assert parser.finish() == []


def test_plain_json_reply_is_held_until_the_end():
    parser = ToolCallParser(NAMES)
    assert parser.feed('{"answer": ') == [] and parser.feed("42}") == []
    assert parser.finish() == ['{"answer": 42}']


@pytest.mark.parametrize(
    ("text", "mode", "function", "calls"),
    [
        ('{"city": "Paris"}', "named", "get_weather", [PARIS]),
        ('[{"name": "add", "arguments": {"a": 1, "b": 2}}]', "required", None, [ONE_TWO]),
        ('{"city": "Par', "named", "get_weather", None),
        ('["x"]', "required", None, None),
        ('{"name": "add", "arguments": {}}', "required", None, None),
    ],
)
def test_forced_replies(text, mode, function, calls):
    assert parse_forced(text, mode, function, NAMES) == calls


def _accumulate(deltas: list[DeltaToolCall]) -> list[dict]:
    """What an OpenAI client builds from the deltas: per index, id and name from the first, arguments joined."""
    calls: dict[int, dict] = {}
    for delta in deltas:
        call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
        if delta.id is not None:
            assert call["id"] is None, "a call's id comes once"
            call["id"], call["name"] = delta.id, delta.function.name
        if delta.function is not None and delta.function.arguments:
            call["arguments"] += delta.function.arguments
    return [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize(
    ("plan", "text"),
    [
        (ToolPlan(tools=[], mode="auto", names=NAMES), f"Sure.<tool_call>[{WEATHER}, {ADD}]</tool_call>"),
        (ToolPlan(tools=[], mode="named", names=NAMES, function="add"), '{"a": 1, "b": 2}'),
        (ToolPlan(tools=[], mode="required", names=NAMES), f"[{WEATHER}, {ADD}]"),
    ],
)
def test_streamed_deltas_accumulate_to_the_whole_reply(plan: ToolPlan, text: str):
    content, calls = reply_message(plan, text)
    assert calls and all(c.id.startswith("call_") and c.type == "function" for c in calls)
    for size in (1, 3, 7):
        stream = ToolDeltas(plan)
        parts, deltas = [], []
        for start in range(0, len(text), size):
            piece, more = stream.feed(text[start : start + size])
            parts.append(piece or "")
            deltas += more
        piece, more = stream.finish()
        parts.append(piece or "")
        deltas += more
        assert ("".join(parts) or None) == content
        got = _accumulate(deltas)
        assert [(g["name"], json.loads(g["arguments"])) for g in got] == [
            (c.function.name, json.loads(c.function.arguments)) for c in calls
        ]
        assert len({g["id"] for g in got}) == len(got) and stream.num_calls == len(calls)
        first = [d for d in deltas if d.id is not None]
        assert all(d.type == "function" and d.function.name for d in first)
