"""One regression test per hardening finding of the HTTP API: each names what it attacks."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from falconlm.cli import main
from falconlm.serving.generation import child_seed

from .conftest import MODEL_NAME, LiveServer, ServerFactory

GOOD = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 3, "temperature": 0}
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def _error(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert "Traceback" not in error["message"]
    return error


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/completions", "suffix", " and they lived happily"),
        ("/v1/completions", "best_of", 3),
        ("/v1/chat/completions", "functions", [{"name": "f", "parameters": {}}]),
        ("/v1/chat/completions", "function_call", {"name": "f"}),
    ],
)
def test_unimplemented_parameter_is_refused_by_name(server: LiveServer, path, field, value):
    body = {**(GOOD if path == "/v1/completions" else CHAT), field: value}
    with server.http() as http:
        error = _error(http.post(path, json=body))
    assert error["param"] == field and "not supported" in error["message"]


@pytest.mark.parametrize(
    ("path", "extra"),
    [
        ("/v1/completions", {"best_of": 1, "suffix": None}),
        ("/v1/completions", {"suffix": ""}),
        ("/v1/chat/completions", {"tools": [], "tool_choice": "none", "functions": None}),
    ],
)
def test_no_op_values_of_unimplemented_parameters_are_accepted(server: LiveServer, path, extra):
    body = {**(GOOD if path == "/v1/completions" else CHAT), **extra}
    with server.http() as http:
        assert http.post(path, json=body).status_code == 200


def test_deeply_nested_json_body_is_a_400(server: LiveServer):
    deep = b'{"prompt": "x", "user": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    medium = json.dumps({**GOOD, "response_format": {"type": "text", "x": [[[[[[[[[[[]]]]]]]]]]] * 1}}).encode()
    nested = json.dumps({**CHAT, "response_format": {"type": "text", "x": json.loads("[" * 80 + "]" * 80)}})
    with server.http() as http:
        json_type = {"Content-Type": "application/json"}
        assert "nests deeper" in _error(http.post("/v1/completions", content=deep, headers=json_type))["message"]
        assert "nests deeper" in _error(http.post("/v1/chat/completions", content=nested, headers=json_type))["message"]
        assert http.post("/v1/completions", content=medium, headers=json_type).status_code == 200


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 2}'),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}'),
        ("/tokenize", '{"prompt": "\\ud83d"}'),
        ("/v1/completions", '{"prompt": "x", "\\ud800": 1}'),
    ],
)
def test_lone_surrogate_in_body_is_a_400(server: LiveServer, path, raw):
    with server.http() as http:
        response = http.post(path, content=raw.encode(), headers={"Content-Type": "application/json"})
        assert "surrogate" in _error(response)["message"]
        pair = '{"prompt": "\\ud83d\\ude00", "max_tokens": 2}'  # a proper pair is one character
        assert (
            http.post("/v1/completions", content=pair, headers={"Content-Type": "application/json"}).status_code == 200
        )


@pytest.mark.parametrize("key", ["5_0", " 5", "+5", "05", "٥", "5.0", "-1"])
def test_logit_bias_key_that_is_not_a_plain_token_id_is_refused(server: LiveServer, key):
    with server.http() as http:
        assert _error(http.post("/v1/completions", json={**GOOD, "logit_bias": {key: 1}}))["param"] == "logit_bias"
        assert http.post("/v1/completions", json={**GOOD, "logit_bias": {"50": 1}}).status_code == 200


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 2**64 - 1])
def test_seed_outside_signed_64_bits_is_refused(server: LiveServer, seed):
    with server.http() as http:
        assert _error(http.post("/v1/completions", json={**GOOD, "seed": seed, "n": 2}))["param"] == "seed"


def test_seed_at_the_top_of_the_range_with_n_2_wraps_and_repeats(server: LiveServer):
    body = {**GOOD, "seed": 2**63 - 1, "n": 2, "temperature": 1.0, "max_tokens": 6}
    with server.http() as http:
        first, again = (http.post("/v1/completions", json=body).json() for _ in range(2))
        low = http.post("/v1/completions", json={**body, "seed": -(2**63), "n": 1}).json()
    texts = [c["text"] for c in first["choices"]]
    assert texts == [c["text"] for c in again["choices"]]
    assert texts[1] == low["choices"][0]["text"]  # choice 1 used seed -2**63
    assert child_seed(2**63 - 1, 1) == -(2**63) and child_seed(5, 2) == 7


def test_models_show_the_served_name_never_the_folder_path(server: LiveServer):
    with server.http() as http:
        listing = http.get("/v1/models").text
        card = http.get(f"/v1/models/{MODEL_NAME}").json()
    assert server.settings.model_path not in listing
    assert card["root"] == MODEL_NAME


def test_n_and_logprobs_caps_are_configurable(start_server: ServerFactory):
    capped = start_server(settings={"max_choices": 2, "max_logprobs": 3})
    with capped.http() as http:
        assert "--max-choices" in _error(http.post("/v1/completions", json={**GOOD, "n": 3}))["message"]
        assert _error(http.post("/v1/completions", json={**GOOD, "prompt": ["a", "b", "c"]}))["param"] == "prompt"
        assert _error(http.post("/v1/completions", json={**GOOD, "logprobs": 4}))["param"] == "logprobs"
        chat = {**CHAT, "logprobs": True, "top_logprobs": 4}
        assert _error(http.post("/v1/chat/completions", json=chat))["param"] == "top_logprobs"
        ok = http.post("/v1/completions", json={**GOOD, "n": 2, "logprobs": 3})
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
        schema = http.get("/openapi.json").json()["components"]["schemas"]["CompletionRequest"]["properties"]
    assert schema["n"]["anyOf"][0]["maximum"] == 2 and schema["logprobs"]["anyOf"][0]["maximum"] == 3


def _aborted(server: LiveServer) -> float:
    with server.http() as http:
        for line in http.get("/metrics").text.splitlines():
            if line.startswith("falconlm_aborted_requests_total "):
                return float(line.split()[1])
    raise AssertionError("no falconlm_aborted_requests_total metric")


def test_client_disconnect_is_counted_as_an_aborted_request(slow_server: LiveServer):
    before = _aborted(slow_server)
    long = {**GOOD, "max_tokens": 100, "ignore_eos": True, "stream": True}
    with slow_server.http() as http, http.stream("POST", "/v1/completions", json=long) as response:
        assert response.status_code == 200
        next(response.iter_lines())
    slow_server.wait_idle()
    deadline = time.monotonic() + 10
    while _aborted(slow_server) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _aborted(slow_server) == before + 1
    with slow_server.http() as http:
        assert 'falconlm_requests_total{finish_reason="abort"}' in http.get("/metrics").text


@pytest.mark.parametrize("key", ["clé", "key\twith-tab", "ключ"])
def test_non_ascii_api_key_is_refused_at_start(key, capsys):
    assert main(["serve", "--api-key", key]) == 2
    err = capsys.readouterr().err
    assert "printable ASCII" in err and len(err.strip().splitlines()) == 1
