"""Bad input gets its status and an OpenAI error object, never a 500 or a hang, and the server keeps serving."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from .conftest import API_KEY, MODEL_NAME, LiveServer

GOOD = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 3, "temperature": 0}
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
LONG_PROMPT = list(range(1, 101)) * 2  # 200 token ids: over the 128-token context

# (case, path, body (dict, or bytes sent as is), status, param)
BAD_INPUTS = [
    ("malformed json", "/v1/completions", b'{"prompt": "x", ', 400, None),
    ("json not an object", "/v1/completions", b"[1, 2]", 400, None),
    ("empty body", "/v1/completions", b"", 400, None),
    ("missing prompt", "/v1/completions", {"model": MODEL_NAME}, 400, "prompt"),
    ("prompt wrong type", "/v1/completions", {**GOOD, "prompt": 5}, 400, "prompt"),
    ("prompt empty", "/v1/completions", {**GOOD, "prompt": []}, 400, "prompt"),
    ("token id outside vocab", "/v1/completions", {**GOOD, "prompt": [1, 99999]}, 400, "prompt"),
    ("max_tokens wrong type", "/v1/completions", {**GOOD, "max_tokens": "ten"}, 400, "max_tokens"),
    ("max_tokens bool", "/v1/completions", {**GOOD, "max_tokens": True}, 400, "max_tokens"),
    ("max_tokens negative", "/v1/completions", {**GOOD, "max_tokens": -5}, 400, "max_tokens"),
    ("max_tokens zero", "/v1/completions", {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens huge", "/v1/completions", {**GOOD, "max_tokens": 10**12}, 400, "max_tokens"),
    ("max_tokens past context", "/v1/completions", {**GOOD, "max_tokens": 125}, 400, "max_tokens"),
    ("temperature negative", "/v1/completions", {**GOOD, "temperature": -0.5}, 400, "temperature"),
    ("temperature wrong type", "/v1/completions", {**GOOD, "temperature": "hot"}, 400, "temperature"),
    ("top_p zero", "/v1/completions", {**GOOD, "top_p": 0}, 400, "top_p"),
    ("n zero", "/v1/completions", {**GOOD, "n": 0}, 400, "n"),
    ("n too many", "/v1/completions", {**GOOD, "n": 1000}, 400, "n"),
    ("logprobs over 20", "/v1/completions", {**GOOD, "logprobs": 21}, 400, "logprobs"),
    ("presence_penalty out of range", "/v1/completions", {**GOOD, "presence_penalty": 3}, 400, "presence_penalty"),
    ("logit_bias bad key", "/v1/completions", {**GOOD, "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("logit_bias outside vocab", "/v1/completions", {**GOOD, "logit_bias": {"99999": 1}}, 400, "logit_bias"),
    ("stop wrong type", "/v1/completions", {**GOOD, "stop": [1]}, 400, "stop"),
    ("stop_options without stream", "/v1/completions", {**GOOD, "stream_options": {}}, 400, "stream_options"),
    ("over-long prompt", "/v1/completions", {**GOOD, "prompt": LONG_PROMPT}, 400, "prompt"),
    ("unknown model", "/v1/completions", {**GOOD, "model": "gpt-9"}, 404, "model"),
    ("chat no messages", "/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("chat messages wrong type", "/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "messages"),
    ("chat bad role", "/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, None),
    (
        "chat image part",
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages",
    ),
    ("chat top_logprobs over 20", "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, 400, None),
    ("chat json_schema", "/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, 400, None),
    ("chat unknown model", "/v1/chat/completions", {**CHAT, "model": "nope"}, 404, "model"),
    ("detokenize outside vocab", "/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("tokenize neither field", "/tokenize", {}, 400, "prompt"),
]


def _assert_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and "Traceback" not in error["message"]
    return error


@pytest.mark.parametrize(("case", "path", "body", "status", "param"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_error_object_then_server_still_serves(server: LiveServer, case, path, body, status, param):
    with server.http() as http:
        if isinstance(body, bytes):
            response = http.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            response = http.post(path, json=body)
        error = _assert_error(response, status)
        if param is not None:
            assert error["param"] == param, error
        good = http.post("/v1/completions", json=GOOD)
        assert good.status_code == 200 and good.json()["choices"][0]["text"]


def test_form_encoded_json_body_is_read(server: LiveServer):
    """curl -d sends application/x-www-form-urlencoded; the JSON body is still parsed."""
    with server.http() as http:
        import json

        response = http.post(
            "/v1/completions",
            content=json.dumps(GOOD).encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": f"Bearer {API_KEY.upper()}"}, 401),
        ({"Authorization": API_KEY}, 401),
        ({"Authorization": f"bearer {API_KEY}"}, 200),
    ],
)
def test_api_key_required_except_health(server: LiveServer, headers, status):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for method, path, body in [
            ("POST", "/v1/completions", GOOD),
            ("GET", "/v1/models", None),
            ("GET", "/metrics", None),
            ("POST", "/tokenize", {"prompt": "x"}),
        ]:
            response = http.request(method, path, json=body, headers=headers)
            if status == 401:
                error = _assert_error(response, 401)
                assert error["code"] == "invalid_api_key"
                assert response.headers["WWW-Authenticate"] == "Bearer"
            else:
                assert response.status_code == 200, response.text
        assert http.get("/health").status_code == 200


def test_openai_client_raises_typed_errors(server: LiveServer):
    import openai

    client = server.openai()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2, temperature=-1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_unknown_route_and_method(server: LiveServer):
    with server.http() as http:
        assert _assert_error(http.get("/v1/nothing"), 404)
        assert _assert_error(http.get("/v1/models/not-a-model"), 404)["code"] == "model_not_found"
        assert _assert_error(http.get("/v1/completions"), 405)


def test_oversized_body_413_declared_and_chunked(server: LiveServer):
    big = {**GOOD, "prompt": "fox " * 300_000}  # ~1.2 MB, over the 1 MiB default
    with server.http() as http:
        _assert_error(http.post("/v1/completions", json=big), 413)

        def chunks():
            yield b'{"prompt": "'
            for _ in range(300):
                yield b"x" * 4096
            yield b'"}'

        _assert_error(http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}), 413)
        assert http.post("/v1/completions", json=GOOD).status_code == 200


def test_queue_full_429_with_retry_after(start_server):
    """One seat, one waiting place: of 8 simultaneous long requests some get 429, the rest complete."""
    server = start_server(max_num_seqs=1, max_waiting=1)
    long = {**GOOD, "max_tokens": 100, "ignore_eos": True}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json=long) for _ in range(8)))

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 429}, statuses
    for response in responses:
        if response.status_code == 429:
            assert _assert_error(response, 429)["code"] == "rate_limit_exceeded"
            assert response.headers["Retry-After"] == "1"
        else:
            assert response.json()["usage"]["completion_tokens"] == 100
    server.wait_idle()
    with server.http() as http:
        assert http.post("/v1/completions", json=GOOD).status_code == 200
