"""Continuous batching through the server: concurrency, preemption, prefix caching, client disconnects."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from .conftest import MODEL_NAME, LiveServer

PROMPTS = [
    "Once upon a time",
    "The bear said hello",
    "Every day the fox ran",
    "Numbers like 123",
    "café, naïve, 東京",
    "They played together",
    "One day she met",
    "The moon came up",
]


def _request(i: int, max_tokens: int) -> dict:
    """Greedy for even i, seeded sampling for odd i: both must not depend on what else runs."""
    sampling = {"temperature": 0.0} if i % 2 == 0 else {"temperature": 0.9, "seed": 100 + i}
    return {
        "model": MODEL_NAME,
        "prompt": PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)),
        "max_tokens": max_tokens,
        **sampling,
    }


def _alone(server: LiveServer, requests: list[dict]) -> list[tuple[str, str]]:
    client = server.openai()
    outs = [client.completions.create(**r).choices[0] for r in requests]
    return [(o.text, o.finish_reason) for o in outs]


async def _together_streaming(server: LiveServer, requests: list[dict]) -> list[tuple[str, str]]:
    client = server.async_openai()

    async def one(r: dict) -> tuple[str, str]:
        text, finish = "", None
        async for chunk in await client.completions.create(**r, stream=True):
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    try:
        return await asyncio.gather(*(one(r) for r in requests))
    finally:
        await client.close()


def _metric(server: LiveServer, name: str) -> float:
    with server.http() as http:
        text = http.get("/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_16_concurrent_streams_equal_each_request_alone(server: LiveServer):
    requests = [_request(i, 16) for i in range(16)]
    alone = _alone(server, requests)
    together = asyncio.run(_together_streaming(server, requests))
    assert together == alone
    assert len(together) == 16 and all(text for text, _ in together)
    server.wait_idle()
    assert server.engine.stats.num_free_blocks == server.engine.stats.num_blocks


def test_preemption_in_a_small_kv_pool_still_completes_every_request(start_server):
    # Each request needs 3 blocks of 16 tokens (prompt + 40 tokens); 6 of them share 7 blocks.
    server = start_server(max_num_seqs=8, num_blocks=7)
    requests = [{**_request(i, 40), "extra_body": {"ignore_eos": True}} for i in range(6)]
    alone = _alone(server, requests)
    assert server.engine.stats.num_preemptions == 0
    together = asyncio.run(_together_streaming(server, requests))
    assert server.engine.stats.num_preemptions > 0
    assert _metric(server, "falconlm_num_preemptions_total") > 0
    assert together == alone
    server.wait_idle()


def test_prefix_cache_hit_raises_metric_and_keeps_output(server: LiveServer, start_server):
    uncached = start_server(max_num_seqs=4, enable_prefix_caching=False)
    tokenizer = server.engine.tokenizer
    prefix = tokenizer.encode("You are a helpful assistant who knows the forest, the fox and the bear well. " * 4)[:70]
    first = {"model": MODEL_NAME, "prompt": prefix + tokenizer.encode(" Tell me"), "max_tokens": 8, "temperature": 0}
    second = {**first, "prompt": prefix + tokenizer.encode(" Who is the fox?")}
    client = server.openai()
    client.completions.create(**first)
    hits_before = _metric(server, "falconlm_prefix_cache_hit_tokens_total")
    cached_out = client.completions.create(**second).choices[0].text
    hits = _metric(server, "falconlm_prefix_cache_hit_tokens_total") - hits_before
    assert hits >= 64  # the 4 full 16-token blocks of the shared prefix
    assert cached_out == uncached.openai().completions.create(**second).choices[0].text
    assert _metric(uncached, "falconlm_prefix_cache_hit_tokens_total") == 0


def test_client_disconnect_mid_stream_frees_blocks(slow_server: LiveServer):
    server = slow_server
    server.wait_idle()
    finished_before = _metric(server, "falconlm_e2e_request_latency_seconds_count")
    body = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 120, "ignore_eos": True, "stream": True}
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert server.engine.stats.num_blocks_in_use > 0
        steps_at_disconnect = server.engine.stats.num_steps
    server.wait_idle(timeout=60)
    # Freed a few steps after the disconnect, far before the 120 it asked for (counted in steps, not seconds).
    assert server.engine.stats.num_steps - steps_at_disconnect <= 20
    # It was aborted, not run to its end: no finished request was recorded.
    assert _metric(server, "falconlm_e2e_request_latency_seconds_count") == finished_before
    with server.http() as http:
        assert http.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2}).status_code == 200


def test_client_gone_before_a_plain_response_aborts_its_requests(slow_server: LiveServer):
    server = slow_server
    server.wait_idle()
    finished_before = _metric(server, "falconlm_e2e_request_latency_seconds_count")
    body = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 120, "ignore_eos": True, "n": 8}
    with (
        httpx.Client(base_url=server.url, headers=server.headers, timeout=0.05) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.post("/v1/completions", json=body)
    server.wait_idle(timeout=5)
    assert _metric(server, "falconlm_e2e_request_latency_seconds_count") == finished_before
