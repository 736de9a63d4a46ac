"""``POST /v1/embeddings`` on a live server: OpenAI's shape through httpx and the openai client (float and base64),
the vectors equal to the engine's own, bad input refused by field, ``--task embed`` servers, metrics."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F
from transformers import FalconModel as HFModel

from falconlm.engine.async_engine import AsyncEngine
from falconlm.server import ServerSettings
from falconlm.serving.embedding_protocol import MAX_EMBEDDING_INPUTS

from .conftest import MODEL_NAME, LiveServer, ServerFactory, load_engine


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """Normalised last-token states of transformers' FalconModel (after ln_f), per token id list."""
    model = HFModel.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32).eval()

    def embed(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            last = model(torch.tensor([ids])).last_hidden_state[0, -1]
        return F.normalize(last, dim=-1).numpy()

    return embed


@pytest.fixture(scope="module")
def embed_server(tiny_checkpoint) -> LiveServer:
    """A server started as ``--task embed`` starts one."""
    engine = AsyncEngine(load_engine(tiny_checkpoint, max_num_seqs=4, task="embed"))
    server = LiveServer(engine, ServerSettings(served_model_names=(MODEL_NAME,))).start()
    yield server
    server.stop()


def test_openai_client_round_trip_float_and_base64(server: LiveServer, reference):
    client = server.openai()
    texts = ["Once upon a time", "the fox", "café 東京 🦊"]
    default = client.embeddings.create(model=MODEL_NAME, input=texts)  # the client asks for base64 by default
    floats = client.embeddings.create(model=MODEL_NAME, input=texts, encoding_format="float")
    tokenizer = server.engine.tokenizer
    assert [d.index for d in floats.data] == [0, 1, 2] and floats.model == MODEL_NAME
    num_tokens = sum(len(tokenizer.encode(t)) for t in texts)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == num_tokens
    for text, a, b in zip(texts, default.data, floats.data, strict=True):
        assert len(a.embedding) == 64 and a.embedding == b.embedding  # float32 either way
        assert np.allclose(b.embedding, reference(tokenizer.encode(text)), atol=1e-5)
    ids = client.embeddings.create(model=MODEL_NAME, input=[[5, 6, 7], [8]], encoding_format="float")
    assert np.allclose(ids.data[1].embedding, reference([8]), atol=1e-5)


def test_http_shapes_base64_dimensions_and_user(server: LiveServer, reference):
    with server.http() as http:
        r = http.post("/v1/embeddings", json={"input": [5, 6, 7], "encoding_format": "base64", "user": "u1"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["data"][0]["object"] == "embedding"
        assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
        vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
        assert np.allclose(vector, reference([5, 6, 7]), atol=1e-5)
        r = http.post("/v1/embeddings", json={"input": "hello fox", "dimensions": 16, "model": MODEL_NAME})
        short = np.array(r.json()["data"][0]["embedding"])
        full = reference(server.engine.tokenizer.encode("hello fox"))
        assert short.shape == (16,) and np.allclose(short, full[:16] / np.linalg.norm(full[:16]), atol=1e-5)
        r = http.post("/v1/embeddings", json={"input": "x " * 300, "truncate_prompt_tokens": 5})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 5


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"input": []}, "input", "must not be empty"),
        ({"input": ""}, "input", "empty"),
        ({"input": [[]]}, "input", "empty"),
        ({"input": [1, 320]}, "input", "outside the vocabulary"),
        ({"input": [[1], [-1]]}, "input", "outside the vocabulary"),
        ({"input": "x " * 300}, "input", "maximum context length"),
        ({"input": [1] * 129}, "input", "maximum context length"),
        ({"input": ["a"] * (MAX_EMBEDDING_INPUTS + 1)}, "input", "at most"),
        ({"input": [1, "a"]}, "input", "none of the accepted types"),
        ({}, "input", "required"),
        ({"input": "a", "dimensions": 65}, "dimensions", "hidden size 64"),
        ({"input": "a", "dimensions": 0}, "dimensions", "greater than or equal to 1"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format", "float"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(server: LiveServer, body, param, message):
    with server.http() as http:
        r = http.post("/v1/embeddings", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_an_unknown_model_is_404(server: LiveServer):
    with server.http() as http:
        r = http.post("/v1/embeddings", json={"input": "a", "model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_embeddings_are_counted_in_metrics(start_server: ServerFactory):
    server = start_server()
    with server.http() as http:
        assert http.post("/v1/embeddings", json={"input": [[1, 2, 3], [4, 5]]}).status_code == 200
        metrics = http.get("/metrics").text
    assert "falconlm_embedding_requests_total 1.0" in metrics
    assert "falconlm_embedding_prompt_tokens_total 5.0" in metrics
    server.wait_idle()


def test_embed_task_serves_embeddings_and_refuses_generation(embed_server: LiveServer, reference):
    client = embed_server.openai()
    out = client.embeddings.create(model=MODEL_NAME, input=[[5, 6, 7]])
    assert np.allclose(out.data[0].embedding, reference([5, 6, 7]), atol=1e-5)
    with pytest.raises(openai.BadRequestError, match="embeddings only"):
        client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="embeddings only"):
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}])
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    with embed_server.http() as http:  # the whole context, though the KV pool holds one sequence only
        assert http.post("/v1/embeddings", json={"input": [1] * 128}).status_code == 200
