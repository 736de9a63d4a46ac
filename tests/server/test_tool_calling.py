"""Tool calling over HTTP: 400s for bad tools and tool choices, and the official ``openai`` client's
``chat.completions.create(tools=...)`` round trip on the embedded default model (plain and streamed, a second
turn with the tool's result). ``required`` and named choices run under the structured-output mask."""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import pytest

from falconlm.engine.async_engine import AsyncEngine
from falconlm.server import ServerSettings

from ..tool_models import STRETCHED_CONTEXT, stretched_default_model
from .conftest import MODEL_NAME, LiveServer, load_engine

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                "metric": {"type": "boolean"},
            },
            "required": ["city", "metric"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 9},
                "b": {"type": "integer", "enum": [1, 2]},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, ADD]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
CHAT = {"model": MODEL_NAME, "messages": QUESTION, "max_tokens": 8}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> Iterator[LiveServer]:
    """A key-less server on the embedded default model (the built-in chat template, so the tool prompt)."""
    path = stretched_default_model(tmp_path_factory.mktemp("default-model"))
    engine = AsyncEngine(load_engine(path, max_num_seqs=8, max_model_len=STRETCHED_CONTEXT))
    server = LiveServer(engine, ServerSettings(served_model_names=(MODEL_NAME,), model_path=str(path))).start()
    yield server
    server.stop()


def _error(response, param: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and "Traceback" not in error["message"], error
    return error["message"]


BAD_SCHEMA = {"type": "object", "properties": {"city": {"type": "nonsense"}}}


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": BAD_SCHEMA}}]},
         "tools[0].function.parameters", "not a valid JSON Schema"),
        ({"tools": [WEATHER, {"type": "function", "function": {"name": "g", "parameters": {"type": "array"}}}]},
         "tools[1].function.parameters", "must describe an object"),
        ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools[0].function.name", "letters"),
        ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools[0].function.name", "64"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "declared twice"),
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type", "'function'"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch"}}},
         "tool_choice.function.name", "'launch'"),
        ({"tool_choice": "required"}, "tool_choice", "there are none"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "'sometimes'"),
        ({"tools": TOOLS, "tool_choice": {"type": "custom", "function": {"name": "add"}}},
         "tool_choice.type", "custom"),
    ],
)  # fmt: skip
def test_bad_tools_are_a_400_naming_the_field(server: LiveServer, extra: dict, param: str, words: str):
    with server.http() as http:
        assert words in _error(http.post("/v1/chat/completions", json={**CHAT, **extra}), param)


UNENFORCEABLE = {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}


@pytest.mark.parametrize(
    ("choice", "param"),
    [({"type": "function", "function": {"name": "tagged"}}, "tools[1].function.parameters"), ("required", "tools")],
)
def test_parameters_the_grammar_engine_cannot_enforce_are_a_400(embedded: LiveServer, choice, param: str):
    tools = [WEATHER, {"type": "function", "function": {"name": "tagged", "parameters": UNENFORCEABLE}}]
    with embedded.http() as http:
        message = _error(http.post("/v1/chat/completions", json={**CHAT, "tools": tools, "tool_choice": choice}), param)
        assert "uniqueItems" in message
        # auto does not constrain the reply: the same tools are fine
        assert http.post("/v1/chat/completions", json={**CHAT, "tools": tools}).status_code == 200


def test_forced_tool_choice_and_response_format_conflict(embedded: LiveServer):
    body = {**CHAT, "tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}
    with embedded.http() as http:
        message = _error(http.post("/v1/chat/completions", json=body), "tool_choice")
    assert "response_format" in message


def test_malformed_tool_types_are_a_400(server: LiveServer):
    with server.http() as http:
        for tools in ("get_weather", [{"type": "function"}], [{"type": "function", "function": {"parameters": {}}}]):
            response = http.post("/v1/chat/completions", json={**CHAT, "tools": tools})
            assert response.status_code == 400 and response.json()["error"]["param"].startswith("tools"), response.text
        response = http.post("/v1/chat/completions", json={**CHAT, "tools": TOOLS, "parallel_tool_calls": "yes"})
        assert _error(response, "parallel_tool_calls")


def _check_calls(message, finish_reason: str) -> None:
    """Tool calls, if any, are well formed and their arguments validate; else there is text content."""
    if message.tool_calls:
        assert finish_reason == "tool_calls"
        for call in message.tool_calls:
            assert call.id.startswith("call_") and call.type == "function"
            jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])
    else:
        assert isinstance(message.content, str) and finish_reason in ("stop", "length")
        assert "<tool_call>" not in message.content or finish_reason == "length" or "</tool_call>" in message.content


@pytest.mark.parametrize("choice", ["auto", None])
def test_auto_reply_is_valid_either_way(embedded: LiveServer, choice):
    client = embedded.openai()
    extra = {} if choice is None else {"tool_choice": choice}
    for seed in (0, 1, 2):
        out = client.chat.completions.create(
            model=MODEL_NAME, messages=QUESTION, tools=TOOLS, max_tokens=24, temperature=1.0, seed=seed, **extra
        )
        (reply,) = out.choices
        _check_calls(reply.message, reply.finish_reason)


def test_tools_reach_the_prompt(embedded: LiveServer):
    """The prompt grows by the tool system prompt: the tools are rendered (the built-in template's fallback)."""
    client = embedded.openai()
    plain = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=1)
    with_tools = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, tools=TOOLS, max_tokens=1)
    tokenizer = embedded.engine.tokenizer
    prompt = tokenizer.apply_chat_template(QUESTION, tools=TOOLS)
    assert with_tools.usage.prompt_tokens == len(tokenizer.encode(prompt)) > plain.usage.prompt_tokens


def test_tool_choice_none_replies_with_content(embedded: LiveServer):
    out = embedded.openai().chat.completions.create(
        model=MODEL_NAME, messages=QUESTION, tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0
    )
    (reply,) = out.choices
    assert reply.message.tool_calls is None and isinstance(reply.message.content, str)
    assert reply.finish_reason in ("stop", "length")


def test_second_turn_with_the_tool_result(embedded: LiveServer):
    client = embedded.openai()
    call = {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "sunny, 21 C"},
    ]
    out = client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=TOOLS, max_tokens=12, seed=3)
    (reply,) = out.choices
    _check_calls(reply.message, reply.finish_reason)
    tokenizer = embedded.engine.tokenizer
    expected = tokenizer.encode(tokenizer.apply_chat_template(messages, tools=TOOLS))
    assert out.usage.prompt_tokens == len(expected)
    assert "sunny, 21 C" in tokenizer.apply_chat_template(messages, tools=TOOLS)


def _accumulate(chunks) -> tuple[str, list[dict], str | None]:
    """Content, tool calls and finish_reason built from streamed deltas, as a client does."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            assert "<tool_call" not in content
            for piece in delta.tool_calls or []:
                call = calls.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
                if piece.id:
                    assert call["id"] is None and piece.type == "function" and piece.function.name
                    call["id"], call["name"] = piece.id, piece.function.name
                call["arguments"] += (piece.function.arguments or "") if piece.function else ""
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_streamed_auto_matches_the_plain_reply(embedded: LiveServer):
    client = embedded.openai()
    kwargs = dict(model=MODEL_NAME, messages=QUESTION, tools=TOOLS, max_tokens=24, temperature=0)
    plain = client.chat.completions.create(**kwargs).choices[0]
    content, calls, finish = _accumulate(client.chat.completions.create(stream=True, **kwargs))
    assert (content or None) == plain.message.content and finish == plain.finish_reason
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in plain.message.tool_calls or []
    ]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_calls_one_tool_with_valid_arguments(embedded: LiveServer, temperature: float):
    client = embedded.openai()
    for seed in (0, 1, 2):
        out = client.chat.completions.create(
            model=MODEL_NAME,
            messages=QUESTION,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=80,
            temperature=temperature,
            seed=seed,
        )
        (reply,) = out.choices
        assert reply.finish_reason == "tool_calls" and len(reply.message.tool_calls) == 1, reply
        assert reply.message.content is None
        _check_calls(reply.message, reply.finish_reason)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_parallel_calls_are_valid_as_far_as_they_go(embedded: LiveServer, temperature: float):
    """With parallel calls the list has no upper bound, and the tiny model tends to keep adding calls until
    max_tokens: a closed list validates call by call; a cut one is still a list of calls so far."""
    client = embedded.openai()
    for seed in (0, 1):
        out = client.chat.completions.create(
            model=MODEL_NAME,
            messages=QUESTION,
            tools=TOOLS,
            tool_choice="required",
            max_tokens=200,
            temperature=temperature,
            seed=seed,
        )
        (reply,) = out.choices
        if reply.finish_reason == "tool_calls":
            assert reply.message.tool_calls
            _check_calls(reply.message, reply.finish_reason)
        else:
            assert reply.finish_reason == "length" and reply.message.content.startswith('[{"name":')
            assert reply.message.tool_calls is None


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("name", ["get_weather", "add"])
def test_named_choice_calls_that_tool(embedded: LiveServer, temperature: float, name: str):
    out = embedded.openai().chat.completions.create(
        model=MODEL_NAME,
        messages=QUESTION,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": name}},
        max_tokens=60,
        temperature=temperature,
        seed=7,
    )
    (reply,) = out.choices
    (call,) = reply.message.tool_calls
    assert call.function.name == name and reply.finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[name])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_streamed_forced_calls_accumulate_to_valid_calls(embedded: LiveServer, choice):
    client = embedded.openai()
    kwargs = dict(
        model=MODEL_NAME,
        messages=QUESTION,
        tools=TOOLS,
        tool_choice=choice,
        parallel_tool_calls=False,
        max_tokens=80,
        temperature=0,
    )
    plain = client.chat.completions.create(**kwargs).choices[0]
    content, calls, finish = _accumulate(client.chat.completions.create(stream=True, **kwargs))
    assert content == "" and finish == "tool_calls" and calls
    for call in calls:
        assert call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["arguments"]), PARAMETERS[call["name"]])
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        (c.function.name, json.loads(c.function.arguments)) for c in plain.message.tool_calls
    ]


def test_readme_flow_required_call_then_the_result(embedded: LiveServer):
    """The README's example: a required call, its message sent back as the client returned it, then the result."""
    client = embedded.openai()
    messages = list(QUESTION)
    kwargs = dict(model=MODEL_NAME, tools=TOOLS, max_tokens=80, temperature=0)
    reply = client.chat.completions.create(
        messages=messages, tool_choice="required", parallel_tool_calls=False, **kwargs
    )
    message = reply.choices[0].message
    (call,) = message.tool_calls
    messages += [message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "21 C"}]
    second = client.chat.completions.create(messages=messages, **kwargs)
    _check_calls(second.choices[0].message, second.choices[0].finish_reason)
    tokenizer = embedded.engine.tokenizer
    prompt = tokenizer.apply_chat_template(messages, tools=TOOLS)
    assert second.usage.prompt_tokens == len(tokenizer.encode(prompt)) and "Tool: 21 C" in prompt
