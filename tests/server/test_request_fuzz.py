"""Property tests for the request validators: arbitrary bytes, unicode (lone surrogates included) and nesting
give a parsed request or a 400 error object, never another exception and never a 5xx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from falconlm.engine.async_engine import AsyncEngine
from falconlm.server import ServerSettings, build_app
from falconlm.server.openapi import below_pattern
from falconlm.serving.errors import APIError, from_value_error
from falconlm.serving.json_body import MAX_JSON_DEPTH, parse_json, validate
from falconlm.serving.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

from .conftest import MODEL_NAME, load_engine

MODELS = (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest)
# Any code point: lone surrogates (U+D800-U+DFFF) included.
ANY_CHAR = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=())
TEXT = st.text(ANY_CHAR, max_size=20)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4), max_leaves=20
)


def _field_values(model) -> st.SearchStrategy[dict[str, Any]]:
    """Objects that use the model's own field names (so validation goes deep), with arbitrary values."""
    names = st.sampled_from(sorted(model.model_fields)) | TEXT
    return st.dictionaries(names, JSON_VALUES, max_size=8)


def _server_path(model, raw: bytes) -> None:
    """What the routes do with a body before the engine: parse, validate, and derive the sampling params."""
    request = validate(parse_json(raw), model)
    if hasattr(request, "to_sampling_params"):
        try:
            request.to_sampling_params(default_max_tokens=16)
        except ValueError as exc:
            raise from_value_error(exc) from exc


def _assert_400_or_ok(model, raw: bytes) -> None:
    try:
        _server_path(model, raw)
    except APIError as exc:
        assert exc.status_code == 400, exc.message
        body = exc.to_dict()["error"]
        assert isinstance(body["message"], str) and body["message"]


@given(raw=st.binary(max_size=200))
@settings(max_examples=200)
def test_arbitrary_bytes_are_a_400_or_a_request(raw):
    for model in MODELS:
        _assert_400_or_ok(model, raw)


@given(data=st.data())
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_arbitrary_json_with_the_models_fields_is_a_400_or_a_request(data):
    model = data.draw(st.sampled_from(MODELS))
    body = data.draw(_field_values(model))
    _assert_400_or_ok(model, json.dumps(body).encode())  # ensure_ascii: lone surrogates travel as \\udXXX


@given(depth=st.integers(min_value=1, max_value=3000), kind=st.sampled_from("[{"))
@settings(max_examples=60)
def test_nesting_of_any_depth_is_a_400_or_a_request(depth, kind):
    inner = "[" * depth + "]" * depth if kind == "[" else '{"a":' * depth + "1" + "}" * depth
    raw = ('{"prompt": "x", "user": ' + inner + "}").encode()
    try:
        parse_json(raw)
    except APIError as exc:
        assert exc.status_code == 400 and depth + 1 > MAX_JSON_DEPTH
    else:
        assert depth + 1 <= MAX_JSON_DEPTH


@given(text=st.text(ANY_CHAR, min_size=1, max_size=10))
def test_text_with_a_lone_surrogate_is_refused_and_other_text_is_kept(text):
    raw = json.dumps({"prompt": text}).encode()
    encodable = True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        encodable = False
    try:
        assert parse_json(raw)["prompt"] == text and encodable
    except APIError as exc:
        assert exc.status_code == 400 and not encodable


@given(limit=st.integers(min_value=1, max_value=300_000), number=st.integers(min_value=0, max_value=400_000))
def test_below_pattern_matches_exactly_the_token_ids_under_the_limit(limit, number):
    import re

    pattern = re.compile(below_pattern(limit))
    assert bool(pattern.match(str(number))) == (number < limit)
    assert not pattern.match("0" + str(number))  # no leading zeros, as the server refuses them


# ---- through the app -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tiny_checkpoint) -> Iterator[TestClient]:
    engine = AsyncEngine(load_engine(tiny_checkpoint))
    settings_ = ServerSettings(served_model_names=(MODEL_NAME,), allowed_hosts=("testserver",))
    with TestClient(build_app(engine, settings_)) as test_client:
        yield test_client


ROUTES = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}


@given(data=st.data())
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_routes_answer_arbitrary_bodies_with_a_result_or_an_error_object(client, data):
    path = data.draw(st.sampled_from(sorted(ROUTES)))
    body = data.draw(_field_values(ROUTES[path]))
    if "max_tokens" in body or path.startswith("/v1/"):
        body["max_tokens"] = 2  # keep generation short; every other field stays arbitrary
        body.pop("stream", None)
    response = client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in error["message"]
