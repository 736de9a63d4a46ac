"""A quantized model behind the OpenAI-compatible server returns valid completions."""

from __future__ import annotations

from pathlib import Path

import pytest

from falconlm.engine.async_engine import AsyncEngine
from falconlm.engine.engine import Engine, EngineConfig
from falconlm.quant import QuantRecipe, load_quantized, quantize_checkpoint
from falconlm.server import ServerSettings
from falconlm.tokenizer import Tokenizer

from ..server.conftest import LiveServer


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory) -> LiveServer:
    folder = quantize_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("serve") / "q", QuantRecipe.parse("int4")).out
    engine = Engine(load_quantized(folder), Tokenizer.from_pretrained(folder), EngineConfig(max_num_seqs=4))
    settings = ServerSettings(served_model_names=("tiny-int4",), model_path=str(folder))
    live = LiveServer(AsyncEngine(engine), settings).start()
    yield live
    live.stop()


def test_quantized_model_serves_completions(server: LiveServer) -> None:
    with server.http() as client:
        body = {"model": "tiny-int4", "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}
        response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    (choice,) = out["choices"]
    assert choice["finish_reason"] in ("length", "stop") and isinstance(choice["text"], str)
    assert 1 <= out["usage"]["completion_tokens"] <= 6
