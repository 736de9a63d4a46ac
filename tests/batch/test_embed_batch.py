"""``/v1/embeddings`` lines in batch jobs (the OpenAI Batch API allows that url): parsed, executed through the same
serving class as online requests, errors as error lines, and a whole job through ``falconlm batch run``."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch

from falconlm.batch.execute import RequestExecutor
from falconlm.batch.jsonl import InvalidLine, ValidLine, parse_line
from falconlm.batch.records import PendingRequest
from falconlm.cli import main
from falconlm.engine.async_engine import AsyncEngine
from falconlm.engine.engine import Engine, EngineConfig
from falconlm.model.falcon import FalconForCausalLM
from falconlm.serving.settings import ServerSettings
from falconlm.tokenizer import Tokenizer

MODEL = "tiny-falcon"
URL = "/v1/embeddings"


def _line(custom_id: str, body: dict) -> bytes:
    return (json.dumps({"custom_id": custom_id, "method": "POST", "url": URL, "body": body}) + "\n").encode()


def test_embedding_lines_parse_and_bad_ones_are_invalid():
    line = parse_line(1, _line("e", {"input": ["a", "b"], "model": "m", "dimensions": 8}))
    assert isinstance(line, ValidLine) and line.url == URL
    for body, code in (({"input": "a", "stream": True}, "unsupported_field"), ({"input": 5}, "invalid_body")):
        bad = parse_line(2, _line("x", body))
        assert isinstance(bad, InvalidLine) and bad.code == code


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    model = FalconForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    engine = AsyncEngine(Engine(model, Tokenizer.from_pretrained(tiny_checkpoint), EngineConfig(max_num_seqs=4)))
    engine.start()
    yield engine
    engine.shutdown(5.0)


def test_an_embedding_response_becomes_an_output_line(engine):
    executor = RequestExecutor(engine, ServerSettings(served_model_names=(MODEL,)))
    body = {"model": MODEL, "input": [[5, 6, 7], [8, 9]], "encoding_format": "float"}
    result = asyncio.run(executor.execute(PendingRequest("e", 1, URL, json.dumps(body))))
    line = json.loads(result.line)
    response = line["response"]["body"]
    assert (result.status, line["error"]) == ("done", None)
    assert response["object"] == "list" and [d["index"] for d in response["data"]] == [0, 1]
    assert (result.prompt_tokens, result.completion_tokens) == (5, 0) == (response["usage"]["prompt_tokens"], 0)
    assert engine.engine.embedder.num_requests >= 2  # ran as engine embedding requests
    bad = asyncio.run(executor.execute(PendingRequest("b", 2, URL, json.dumps({"model": MODEL, "input": []}))))
    assert bad.status == "failed" and "input must not be empty" in json.loads(bad.line)["error"]["message"]


def test_a_job_of_embedding_lines_through_the_cli(tmp_path, tiny_checkpoint):
    lines = [
        _line("a", {"model": "text-embedding-3-small", "input": "Once upon a time"}),
        _line("b", {"model": "text-embedding-3-small", "input": ["the fox", "the bear"], "encoding_format": "base64"}),
        _line("long", {"model": "text-embedding-3-small", "input": "fox " * 400}),
    ]
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(lines))
    argv = ["batch", "run", str(source), "-o", str(tmp_path / "out.jsonl"), "--errors", str(tmp_path / "err.jsonl")]
    argv += ["--state", str(tmp_path / "state"), "--model", str(tiny_checkpoint), "--dtype", "float32"]
    assert main(argv) == 0
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    err = [json.loads(x) for x in (tmp_path / "err.jsonl").read_text().splitlines()]
    assert [o["custom_id"] for o in out] == ["a", "b"]
    first = out[0]["response"]["body"]["data"][0]["embedding"]
    assert len(first) == 64 and abs(np.linalg.norm(first) - 1) < 1e-5
    encoded = out[1]["response"]["body"]["data"][1]["embedding"]
    assert isinstance(encoded, str) and len(encoded) == 4 * ((64 * 4 + 2) // 3)
    assert [(e["custom_id"], e["error"]["code"]) for e in err] == [("long", "invalid_request_error")]
    assert "maximum context length" in err[0]["error"]["message"]
