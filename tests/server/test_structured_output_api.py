"""Structured output over HTTP on the tiny random-weight checkpoint: response_format in chat and completions (also
streamed, also through the openai client), vLLM's guided_* and structured_outputs fields, the 400s naming the
field, one compilation per schema, and a batch job line with response_format."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator

import httpx
import jsonschema
import pytest

from falconlm.batch.execute import RequestExecutor
from falconlm.batch.records import PendingRequest
from falconlm.engine.async_engine import AsyncEngine
from falconlm.serving.settings import ServerSettings

from ..conftest import make_hf_checkpoint
from .conftest import MODEL_NAME, LiveServer, load_engine

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 12},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "genres": {"type": "array", "items": {"enum": ["drama", "comedy", "noir"]}, "minItems": 1, "maxItems": 3},
        "cast": {
            "type": "array",
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 8}, "lead": {"type": "boolean"}},
                "required": ["name", "lead"],
            },
        },
    },
    "required": ["title", "year", "genres", "cast"],
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "film", "schema": SCHEMA, "strict": True}}
MESSAGES = [{"role": "user", "content": "Describe a film as JSON."}]
CHAT = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 200}
COMPLETION = {"model": MODEL_NAME, "prompt": "A film:", "max_tokens": 200}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LiveServer]:
    """A random-weight 7b-shaped checkpoint with room for a prompt and 200 tokens of JSON."""
    checkpoint = make_hf_checkpoint(tmp_path_factory.mktemp("structured"), "7b", max_position_embeddings=512)
    engine = AsyncEngine(load_engine(checkpoint, max_num_seqs=8))
    settings = ServerSettings(served_model_names=(MODEL_NAME,), model_path=str(checkpoint))
    live = LiveServer(engine, settings).start()
    yield live
    live.stop()


def _post(server: LiveServer, path: str, body: dict) -> httpx.Response:
    with server.http() as http:
        return http.post(path, json=body)


def _texts(response: httpx.Response, chat: bool) -> list[tuple[str, str]]:
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    return [(c["message"]["content"] if chat else c["text"], c["finish_reason"]) for c in choices]


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 7, "n": 3}])
def test_chat_json_schema_with_the_openai_client(server: LiveServer, sampling: dict) -> None:
    client = server.openai()
    reply = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=200, response_format=RESPONSE_FORMAT, **sampling
    )
    assert len(reply.choices) == sampling.get("n", 1)
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


@pytest.mark.parametrize("seed", [1, 2])
def test_completions_take_response_format_too(server: LiveServer, seed: int) -> None:
    body = {**COMPLETION, "response_format": RESPONSE_FORMAT, "temperature": 1.0, "seed": seed}
    for text, finish in _texts(_post(server, "/v1/completions", body), chat=False):
        assert finish == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)
    body = {**COMPLETION, "response_format": {"type": "json_object"}, "temperature": 1.0, "seed": seed}
    ((text, finish),) = _texts(_post(server, "/v1/completions", body), chat=False)
    assert finish == "stop" and isinstance(json.loads(text), dict)


def test_streamed_chunks_join_into_valid_json(server: LiveServer) -> None:
    client = server.openai()
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        max_tokens=200,
        temperature=1.0,
        seed=3,
        response_format=RESPONSE_FORMAT,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    jsonschema.validate(json.loads(text), SCHEMA)


PATTERN = r"[A-Z]{2}-[0-9]{4}"
CHOICES = ["approve", "reject", "escalate"]


@pytest.mark.parametrize(
    ("extra", "check"),
    [
        ({"guided_json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
        ({"guided_json": json.dumps(SCHEMA)}, lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
        ({"guided_regex": PATTERN}, lambda t: re.fullmatch(PATTERN, t) or pytest.fail(t)),
        ({"guided_choice": CHOICES}, lambda t: t in CHOICES or pytest.fail(t)),
        ({"guided_grammar": 'root ::= "id:" [0-9] [0-9] [0-9]'}, lambda t: re.fullmatch(r"id:[0-9]{3}", t)),
        ({"structured_outputs": {"json": SCHEMA}}, lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
        ({"structured_outputs": {"regex": PATTERN}}, lambda t: re.fullmatch(PATTERN, t) or pytest.fail(t)),
        ({"structured_outputs": {"choice": CHOICES}}, lambda t: t in CHOICES or pytest.fail(t)),
        ({"structured_outputs": {"json_object": True}}, lambda t: isinstance(json.loads(t), dict) or pytest.fail(t)),
    ],
    ids=lambda v: json.dumps(v)[:40] if isinstance(v, dict) else "check",
)
def test_vllm_extra_body_constraints(server: LiveServer, extra: dict, check) -> None:
    client = server.openai()
    bias = {}
    if "json_object" in extra.get("structured_outputs", {}):  # a free-form object closes only when a model wants
        tokenizer = server.engine.tokenizer
        bias = {str(t): 10 for t in range(tokenizer.vocab_size) if tokenizer.decode([t]).endswith("}")}
    for seed in (0, 1):
        reply = client.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,
            max_tokens=200,
            temperature=1.0,
            seed=seed,
            logit_bias=bias or None,
            extra_body=extra,
        )
        assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
        check(reply.choices[0].message.content)


BAD = [
    (
        "unsupported schema feature",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
                },
            }
        },
        "response_format",
        "uniqueItems",
    ),
    (
        "nested unsupported feature",
        {"guided_json": {"type": "object", "properties": {"a": {"type": "object", "if": {}, "then": {}}}}},
        "guided_json",
        "/properties/a",
    ),
    ("invalid regex", {"guided_regex": "[0-9"}, "guided_regex", "cannot be enforced"),
    ("look-around regex", {"structured_outputs": {"regex": "(?<=a)b"}}, "structured_outputs.regex", "look-around"),
    ("bad grammar", {"guided_grammar": "start: nowhere"}, "guided_grammar", "nowhere"),
    ("two constraints", {"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice", "one structured-output"),
    (
        "response_format and guided_json",
        {"response_format": {"type": "json_object"}, "guided_json": {"type": "object"}},
        "guided_json",
        "one structured-output",
    ),
    ("bad response_format type", {"response_format": {"type": "xml"}}, "response_format", "'xml'"),
    ("json_schema without its object", {"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ("guided_json not JSON", {"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ("empty choice", {"guided_choice": []}, "guided_choice", "choice"),
]


@pytest.mark.parametrize(("case", "extra", "param", "words"), BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_bad_constraints_are_400s_naming_the_field(server: LiveServer, case, extra, param, words, path) -> None:
    body = {**(CHAT if "chat" in path else COMPLETION), **extra}
    response = _post(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert "Traceback" not in error["message"]
    server.wait_idle()


def test_a_schema_compiles_once(server: LiveServer) -> None:
    grammars = server.engine.engine.grammars
    schema = {"type": "object", "properties": {"answer": {"enum": ["forty-two"]}}, "required": ["answer"]}
    before = grammars.num_compiled
    for seed in range(3):
        body = {**CHAT, "temperature": 1.0, "seed": seed, "guided_json": schema}
        ((text, _),) = _texts(_post(server, "/v1/chat/completions", body), chat=True)
        assert json.loads(text) == {"answer": "forty-two"}
    assert grammars.num_compiled == before + 1


def test_batch_line_with_response_format(server: LiveServer) -> None:
    executor = RequestExecutor(server.engine, ServerSettings(served_model_names=(MODEL_NAME,)))
    body = {**CHAT, "temperature": 1.0, "seed": 4, "response_format": RESPONSE_FORMAT}
    row = PendingRequest("film-1", 1, "/v1/chat/completions", json.dumps(body))
    result = asyncio.run(executor.execute(row))
    line = json.loads(result.line)
    assert result.status == "done", line
    choice = line["response"]["body"]["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
    bad = {**CHAT, "guided_regex": "(?=x)"}
    failed = asyncio.run(executor.execute(PendingRequest("bad-1", 2, "/v1/chat/completions", json.dumps(bad))))
    assert failed.status == "failed" and "cannot be enforced" in json.loads(failed.line)["error"]["message"]
