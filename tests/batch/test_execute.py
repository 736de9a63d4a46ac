"""One stored request through the serving layer: the typed response becomes the output line, typed errors an
error line or a request left pending."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from falconlm.batch.execute import LeftPending, RequestExecutor
from falconlm.batch.records import PendingRequest
from falconlm.engine.async_engine import AsyncEngine
from falconlm.engine.engine import Engine, EngineConfig
from falconlm.model.falcon import FalconForCausalLM
from falconlm.serving.settings import ServerSettings
from falconlm.tokenizer import Tokenizer

MODEL = "tiny-falcon"


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    model = FalconForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    engine = AsyncEngine(Engine(model, Tokenizer.from_pretrained(tiny_checkpoint), EngineConfig(max_num_seqs=4)))
    engine.start()
    yield engine
    engine.shutdown(5.0)


def row(custom_id: str, body: dict, url: str = "/v1/completions") -> PendingRequest:
    return PendingRequest(custom_id, 1, url, json.dumps(body))


def test_a_response_becomes_an_output_line(engine):
    executor = RequestExecutor(engine, ServerSettings(served_model_names=(MODEL,)))
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    result = asyncio.run(executor.execute(row("a", body)))
    line = json.loads(result.line)
    response = line["response"]["body"]
    assert (result.status, line["custom_id"], line["error"]) == ("done", "a", None)
    assert response["object"] == "text_completion" and response["choices"][0]["finish_reason"] == "length"
    assert (result.prompt_tokens, result.completion_tokens) == (
        response["usage"]["prompt_tokens"],
        response["usage"]["completion_tokens"],
    )
    assert result.completion_tokens == 3 and result.prompt_tokens > 0

    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    result = asyncio.run(executor.execute(row("c", chat, "/v1/chat/completions")))
    assert json.loads(result.line)["response"]["body"]["object"] == "chat.completion"


def test_typed_errors_become_error_lines(engine):
    executor = RequestExecutor(engine, ServerSettings(served_model_names=(MODEL,), max_logprobs=2))
    unknown = asyncio.run(executor.execute(row("m", {"model": "gpt-9", "prompt": "x", "max_tokens": 1})))
    too_many = asyncio.run(executor.execute(row("l", {"model": MODEL, "prompt": "x", "logprobs": 5})))
    for result, custom_id in ((unknown, "m"), (too_many, "l")):
        line = json.loads(result.line)
        assert (result.status, line["custom_id"], line["response"]) == ("failed", custom_id, None)
    assert json.loads(unknown.line)["error"]["code"] == "model_not_found"
    assert json.loads(too_many.line)["error"]["code"] == "invalid_request_error"  # the type when no code is set
    ignoring = RequestExecutor(engine, ServerSettings(served_model_names=(MODEL,)), ignore_body_model=True)
    assert asyncio.run(ignoring.execute(row("m", {"model": "gpt-9", "prompt": "x", "max_tokens": 1}))).status == "done"


def test_a_stopped_engine_leaves_the_request_pending(tiny_checkpoint):
    model = FalconForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    stopped = AsyncEngine(Engine(model, Tokenizer.from_pretrained(tiny_checkpoint), EngineConfig(max_num_seqs=2)))
    stopped.start()
    stopped.shutdown(5.0)
    executor = RequestExecutor(stopped, ServerSettings(served_model_names=(MODEL,)))
    with pytest.raises(LeftPending) as left:
        asyncio.run(executor.execute(row("s", {"model": MODEL, "prompt": "x", "max_tokens": 1})))
    assert left.value.engine_stopped
