"""A batch line with tools runs through the chat serving like an online request: its output line carries the
reply (content or tool calls), and a line with bad tools becomes an error line naming the field."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
import torch

from falconlm.batch.execute import RequestExecutor
from falconlm.batch.records import PendingRequest
from falconlm.engine.async_engine import AsyncEngine
from falconlm.engine.engine import Engine, EngineConfig
from falconlm.model.falcon import FalconForCausalLM
from falconlm.serving.settings import ServerSettings
from falconlm.tokenizer import Tokenizer

from ..tool_models import STRETCHED_CONTEXT, stretched_default_model

MODEL = "default"
PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
    "required": ["city"],
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": PARAMETERS}}]
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = stretched_default_model(tmp_path_factory.mktemp("default-model"))
    model = FalconForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = EngineConfig(max_num_seqs=4, max_model_len=STRETCHED_CONTEXT)
    engine = AsyncEngine(Engine(model, Tokenizer.from_pretrained(path), config))
    engine.start()
    yield engine
    engine.shutdown(5.0)


def _run(engine, custom_id: str, body: dict) -> dict:
    executor = RequestExecutor(engine, ServerSettings(served_model_names=(MODEL,)))
    result = asyncio.run(executor.execute(PendingRequest(custom_id, 1, CHAT, json.dumps(body))))
    return json.loads(result.line)


def test_a_line_with_tools_gets_a_chat_reply(engine):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    line = _run(engine, "t", {"model": MODEL, "messages": messages, "tools": TOOLS, "max_tokens": 16, "seed": 1})
    assert line["error"] is None and line["custom_id"] == "t"
    (choice,) = line["response"]["body"]["choices"]
    message = choice["message"]
    for call in message.get("tool_calls") or []:
        assert call["function"]["name"] == "get_weather" and choice["finish_reason"] == "tool_calls"
        jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMETERS)
    if not message.get("tool_calls"):
        assert isinstance(message["content"], str) and choice["finish_reason"] in ("stop", "length")


def test_a_line_with_bad_tools_is_an_error_line(engine):
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": 3}}}]
    line = _run(engine, "b", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": bad})
    assert line["response"] is None
    assert line["error"]["message"].startswith("tools[0].function.parameters is not a valid JSON Schema")


def test_a_line_with_a_required_tool_gets_a_valid_call(engine):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Weather in Rome?"}],
        "tools": TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_tokens": 40,
        "temperature": 0.8,
        "seed": 5,
    }
    line = _run(engine, "r", body)
    (choice,) = line["response"]["body"]["choices"]
    (call,) = choice["message"]["tool_calls"]
    assert choice["finish_reason"] == "tool_calls" and call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMETERS)
