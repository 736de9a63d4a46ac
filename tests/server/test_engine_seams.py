"""The server over the thin AsyncEngine: prompt logprobs from the engine step, n choices as one parent request,
queue times from the request's events."""

from __future__ import annotations

import pytest

from .conftest import MODEL_NAME, LiveServer

PROMPT = "Once upon a time there was a little fox"


def _metric(server: LiveServer, name: str) -> float:
    with server.http() as http:
        text = http.get("/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}
    return values[name]


def test_echo_logprobs_with_n_choices_plain_and_streamed(server: LiveServer):
    client = server.openai()
    ids = server.engine.tokenizer.encode(PROMPT)
    out = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=3, temperature=1.0, seed=5, n=2, logprobs=1, echo=True
    )
    assert [c.index for c in out.choices] == [0, 1]
    prompt_parts = [c.logprobs.token_logprobs[: len(ids)] for c in out.choices]
    assert prompt_parts[0][0] is None and all(x is not None and x <= 0 for x in prompt_parts[0][1:])
    assert prompt_parts[1] == pytest.approx(prompt_parts[0])  # both children scored the same prompt
    stream = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=3, temperature=1.0, seed=5, n=2, logprobs=1, echo=True, stream=True
    )
    texts = {0: "", 1: ""}
    tokens: dict[int, list[str]] = {0: [], 1: []}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.logprobs:
                tokens[c.index] += c.logprobs.tokens
    for choice in out.choices:  # the same seeds: the stream repeats the plain response
        assert texts[choice.index] == choice.text
        assert tokens[choice.index] == choice.logprobs.tokens
    server.wait_idle()


def test_queue_time_is_observed_once_per_choice(server: LiveServer):
    before = _metric(server, "falconlm_request_queue_time_seconds_count")
    server.openai().completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2, n=3)
    assert _metric(server, "falconlm_request_queue_time_seconds_count") == before + 3
