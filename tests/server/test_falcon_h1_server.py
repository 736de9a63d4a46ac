"""A quantized Falcon-H1 behind the OpenAI server: completions, streamed chat and a batch of mixed lengths come
back valid, and each text equals what the same engine gives the prompt alone."""

from __future__ import annotations

import json

import httpx
import pytest

from falconlm.engine.async_engine import AsyncEngine
from falconlm.engine.factory import EngineArgs, build_engine
from falconlm.server import ServerSettings
from tests.model.h1_checkpoints import save_hf_h1
from tests.server.conftest import LiveServer

MODEL = "tiny-h1"


@pytest.fixture(scope="module")
def h1_server(tmp_path_factory):
    folder = save_hf_h1(tmp_path_factory.mktemp("h1") / "ckpt", with_tokenizer=True)
    engine = build_engine(EngineArgs(model=folder, quantize="int4", dtype="float32", max_num_seqs=4))
    async_engine = AsyncEngine(engine)
    settings = ServerSettings(served_model_names=(MODEL,), model_path=str(folder))
    server = LiveServer(async_engine, settings).start()
    yield server
    server.stop()


def _complete(server: LiveServer, prompt: str, max_tokens: int = 6) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_completions_from_a_quantized_h1(h1_server) -> None:
    out = _complete(h1_server, "Once upon a time")
    choice = out["choices"][0]
    assert out["object"] == "text_completion" and out["model"] == MODEL
    assert choice["finish_reason"] in ("length", "stop") and isinstance(choice["text"], str)
    assert 0 < out["usage"]["completion_tokens"] <= 6 and out["usage"]["prompt_tokens"] > 0


def test_concurrent_requests_each_equal_their_request_alone(h1_server) -> None:
    prompts = ["Once upon a time", "The cat", "A little girl named Lily went to the park with her mom and"]
    alone = [_complete(h1_server, p)["choices"][0]["text"] for p in prompts]
    body = {"model": MODEL, "prompt": prompts, "max_tokens": 6, "temperature": 0}
    together = httpx.post(f"{h1_server.url}/v1/completions", json=body, timeout=60).json()
    texts = [c["text"] for c in sorted(together["choices"], key=lambda c: c["index"])]
    assert texts == alone


def test_streamed_chat_from_a_quantized_h1(h1_server) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{h1_server.url}/v1/chat/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        lines = [line for line in reply.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert any(c["choices"] and c["choices"][0].get("finish_reason") for c in chunks)


@pytest.fixture(scope="module")
def h1_folder(tmp_path_factory):
    return save_hf_h1(tmp_path_factory.mktemp("h1-plain") / "ckpt", with_tokenizer=True)


def test_batch_job_lines_through_the_serving_layer(h1_folder) -> None:
    import asyncio

    from falconlm.batch.execute import RequestExecutor
    from falconlm.batch.records import PendingRequest

    engine = AsyncEngine(build_engine(EngineArgs(model=h1_folder, dtype="float32", max_num_seqs=2)))
    engine.start()
    try:
        executor = RequestExecutor(engine, ServerSettings(served_model_names=(MODEL,)))
        lines = []
        for i, prompt in enumerate(["The bear", "A longer line about the river, the hills and the sea"]):
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
            request = PendingRequest(f"l{i}", 1, "/v1/completions", json.dumps(body))
            lines.append(asyncio.run(executor.execute(request)))
    finally:
        engine.shutdown(5.0)
    assert [(line.status, line.completion_tokens) for line in lines] == [("done", 3), ("done", 3)]


def test_quantized_checkpoint_written_then_served(h1_folder, tmp_path) -> None:
    """``falconlm quantize``'s writer on an H1 folder: the stored int8 checkpoint loads as quantized and gives the
    same greedy tokens as quantizing on load."""
    from falconlm.engine.sampling_params import SamplingParams
    from falconlm.llm import LLM
    from falconlm.quant import QuantRecipe, quantize_checkpoint
    from falconlm.quant.linear import QuantizedLinear

    out = tmp_path / "int8"
    quantize_checkpoint(h1_folder, out, QuantRecipe.parse("int8"))
    stored = LLM(out, dtype="float32", max_num_seqs=2)
    assert isinstance(stored.model.model.layers[1].mamba.in_proj, QuantizedLinear)
    on_load = LLM(h1_folder, dtype="float32", max_num_seqs=2, quantize="int8")
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    prompts = ["Stored and served", "Once upon a time"]
    got = [o.outputs[0].token_ids for o in stored.generate(prompts, params)]
    assert got == [o.outputs[0].token_ids for o in on_load.generate(prompts, params)]
    assert all(len(tokens) == 5 for tokens in got)
