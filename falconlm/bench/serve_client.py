"""Load generator for an OpenAI-compatible ``/v1/completions`` server, with vLLM's metric definitions.

Two load shapes: a closed loop of N clients (each sends its next request when the previous one ends) or an open
loop of Poisson arrivals at R requests/s. Every request streams (``stream: true`` with ``include_usage``); per
request we keep the send time, the arrival time of each text chunk and the token counts from the usage chunk.

Metrics (vLLM's ``benchmark_serving`` definitions):
- TTFT: send to the first chunk carrying text.
- TPOT: (end-to-end latency - TTFT) / (output tokens - 1), for requests with at least two output tokens.
- ITL: every gap between consecutive text chunks, pooled over all requests.
- E2E latency: send to the end of the stream (``data: [DONE]``).
Throughputs divide by the benchmark duration (first send to last answer) and count successful requests only.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np

Prompt = str | list[int]

# Common English words that the Falcon tokenizer encodes as one token each (with their leading space).
_WORD_TEXT = (
    "the of and to in is was for on that with as by at from his her they this which are be had not but have one "
    "all were when we there can an your more their what so if out about up into them some time could other then "
    "only these two may first would like over people its after new now our most made also back very many years "
    "where way through down should each long great just because well good much own world work part day still "
    "little life state even here since place three must old see under same found last right never take while "
    "might know house school city year high end water name small every country find home hand does word large "
    "often men number again side king"
)
WORDS = tuple(_WORD_TEXT.split())

MAX_ERROR_CHARS = 200


def completions_url(url: str) -> str:
    """``http://host:port`` (or ``.../v1``) -> ``http://host:port/v1/completions``; a full endpoint stays."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("/completions"):
        path += "/completions" if path.endswith("/v1") else "/v1/completions"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def make_prompts(num_prompts: int, prompt_len: int, seed: int = 0) -> list[str]:
    """``num_prompts`` different strings of ``prompt_len`` random common words (about one token per word)."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=prompt_len)) for _ in range(num_prompts)]


def poisson_arrivals(num_requests: int, rate: float, seed: int = 0) -> list[float]:
    """Send offsets in seconds for a Poisson process of ``rate`` requests/s (``inf``: all at once)."""
    if not rate > 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    if math.isinf(rate):
        return [0.0] * num_requests
    rng = random.Random(seed)
    offsets, now = [], 0.0
    for _ in range(num_requests):
        offsets.append(now)
        now += rng.expovariate(rate)
    return offsets


@dataclass
class RequestRecord:
    """What one request did: times are ``time.perf_counter()`` seconds."""

    index: int
    prompt_estimate: int  # tokens we think we sent; the usage chunk's count wins when present
    send_time: float = 0.0
    end_time: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None  # from the usage chunk
    completion_tokens: int | None = None  # from the usage chunk
    text: str = ""
    error: str | None = None

    @property
    def success(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.send_time if self.chunk_times else None

    @property
    def e2e(self) -> float:
        return self.end_time - self.send_time

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.chunk_times)]

    @property
    def output_tokens(self) -> int:
        """Output tokens from the usage chunk, else the number of text chunks."""
        return self.completion_tokens if self.completion_tokens is not None else len(self.chunk_times)

    @property
    def input_tokens(self) -> int:
        return self.prompt_tokens if self.prompt_tokens is not None else self.prompt_estimate

    @property
    def tpot(self) -> float | None:
        ttft, n = self.ttft, self.output_tokens
        return (self.e2e - ttft) / (n - 1) if ttft is not None and n > 1 else None


def summarize_ms(values: Sequence[float]) -> dict[str, float | None]:
    """Mean, median and p99 of seconds, in milliseconds (None when there is nothing to summarize)."""
    if not values:
        return {"mean": None, "median": None, "p99": None}
    ms = np.asarray(values, dtype=np.float64) * 1000.0
    return {"mean": float(ms.mean()), "median": float(np.median(ms)), "p99": float(np.percentile(ms, 99))}


@dataclass
class BenchResult:
    """All request records of one run, and the metrics computed from them."""

    url: str
    model: str | None
    concurrency: int | None
    request_rate: float | None
    max_tokens: int
    duration_s: float
    records: list[RequestRecord]

    @property
    def ok(self) -> list[RequestRecord]:
        return [r for r in self.records if r.success]

    @property
    def completed(self) -> int:
        return len(self.ok)

    @property
    def failed(self) -> int:
        return len(self.records) - self.completed

    def errors(self) -> dict[str, int]:
        """Distinct error messages and how often each happened, most frequent first."""
        return dict(Counter(r.error for r in self.records if r.error is not None).most_common())

    def latency_ms(self) -> dict[str, dict[str, float | None]]:
        ok = self.ok
        return {
            "ttft_ms": summarize_ms([r.ttft for r in ok if r.ttft is not None]),
            "tpot_ms": summarize_ms([r.tpot for r in ok if r.tpot is not None]),
            "itl_ms": summarize_ms([gap for r in ok for gap in r.itls]),
            "e2e_latency_ms": summarize_ms([r.e2e for r in ok]),
        }

    def to_dict(self, per_request: bool = False) -> dict[str, Any]:
        """Plain JSON-ready numbers (an infinite request rate is written as the string "inf")."""
        ok, seconds = self.ok, max(self.duration_s, 1e-9)
        prompt_tokens = sum(r.input_tokens for r in ok)
        output_tokens = sum(r.output_tokens for r in ok)
        rate = self.request_rate
        out: dict[str, Any] = {
            "url": self.url,
            "model": self.model,
            "concurrency": self.concurrency,
            "request_rate": "inf" if rate is not None and math.isinf(rate) else rate,
            "max_tokens": self.max_tokens,
            "num_requests": len(self.records),
            "completed": self.completed,
            "failed": self.failed,
            "duration_s": self.duration_s,
            "total_prompt_tokens": prompt_tokens,
            "total_output_tokens": output_tokens,
            "request_throughput": self.completed / seconds,
            "output_throughput": output_tokens / seconds,
            "total_token_throughput": (prompt_tokens + output_tokens) / seconds,
            **self.latency_ms(),
            "errors": self.errors(),
        }
        if per_request:
            out["requests"] = [_record_dict(r) for r in self.records]
        return out

    def table(self) -> str:
        """A readable text report."""
        d = self.to_dict()
        if self.concurrency is not None:
            load = f"{self.concurrency} concurrent client{'s' if self.concurrency != 1 else ''} (closed loop)"
        else:
            load = f"Poisson arrivals at {self.request_rate:g} req/s (open loop)"
        lines = [
            f"Serving benchmark: {self.url}" + (f" (model {self.model})" if self.model else ""),
            f"Load:        {load}, max_tokens {self.max_tokens}",
            f"Requests:    {d['completed']} completed, {d['failed']} failed, in {d['duration_s']:.2f} s",
            f"Tokens:      {d['total_prompt_tokens']} prompt, {d['total_output_tokens']} output",
            f"Throughput:  {d['request_throughput']:.2f} req/s, {d['output_throughput']:.1f} output tok/s, "
            f"{d['total_token_throughput']:.1f} total tok/s",
            "",
            f"{'metric':<18}{'mean':>10}{'median':>10}{'p99':>10}",
        ]
        names = {"ttft_ms": "TTFT (ms)", "tpot_ms": "TPOT (ms)", "itl_ms": "ITL (ms)", "e2e_latency_ms": "E2E (ms)"}
        for key, name in names.items():
            lines.append(f"{name:<18}" + "".join(_cell(d[key][stat]) for stat in ("mean", "median", "p99")))
        if d["errors"]:
            lines += ["", "Errors:"] + [f"  {count} x {message}" for message, count in d["errors"].items()]
        return "\n".join(lines)


def _cell(value: float | None) -> str:
    return f"{'-':>10}" if value is None else f"{value:>10.2f}"


def _record_dict(r: RequestRecord) -> dict[str, Any]:
    return {
        "index": r.index,
        "success": r.success,
        "error": r.error,
        "prompt_tokens": r.input_tokens,
        "output_tokens": r.output_tokens,
        "ttft_ms": None if r.ttft is None else r.ttft * 1000,
        "e2e_ms": r.e2e * 1000,
        "chunks": len(r.chunk_times),
    }


def _error_message(raw: bytes) -> str:
    """The message of an OpenAI error object, else the start of the body."""
    text = raw.decode("utf-8", "replace")
    try:
        body = json.loads(text)
        message = body["error"]["message"] if isinstance(body.get("error"), dict) else body.get("error", text)
    except (ValueError, AttributeError, KeyError, TypeError):
        message = text
    return " ".join(str(message).split())[:MAX_ERROR_CHARS] or "(empty body)"


async def _stream(client: httpx.AsyncClient, url: str, body: dict, headers: dict, record: RequestRecord) -> None:
    """POST one streaming completion and fill ``record`` from its server-sent events."""
    pieces: list[str] = []
    async with client.stream("POST", url, json=body, headers=headers) as response:
        if response.status_code != 200:
            record.error = f"HTTP {response.status_code}: {_error_message(await response.aread())}"
            return
        done = False
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments, event names
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            now = time.perf_counter()
            try:
                event = json.loads(data)
            except ValueError:
                event = None
            if not isinstance(event, dict):
                record.error = f"malformed event: {data[:MAX_ERROR_CHARS]}"
                return
            if event.get("error") is not None:
                record.error = f"error event: {_error_message(data.encode())}"
                return
            choices = event.get("choices")
            first = choices[0] if isinstance(choices, list) and choices else None
            text = first.get("text") if isinstance(first, dict) else None
            if text:
                record.chunk_times.append(now)
                pieces.append(text)
            usage = event.get("usage")
            if isinstance(usage, dict):
                record.prompt_tokens = usage.get("prompt_tokens", record.prompt_tokens)
                record.completion_tokens = usage.get("completion_tokens", record.completion_tokens)
    record.text = "".join(pieces)
    if not done:
        record.error = "stream ended before data: [DONE]"


async def _send(
    client: httpx.AsyncClient, url: str, body: dict, headers: dict, record: RequestRecord, timeout: float
) -> None:
    record.send_time = time.perf_counter()
    try:
        await asyncio.wait_for(_stream(client, url, body, headers, record), timeout)
    except asyncio.TimeoutError:
        record.error = f"no complete answer within {timeout:g} s"
    except (httpx.HTTPError, OSError) as exc:
        record.error = f"{type(exc).__name__}: {' '.join(str(exc).split())}".rstrip(": ")
    record.end_time = time.perf_counter()


async def _discover_model(client: httpx.AsyncClient, url: str, headers: dict) -> str | None:
    """Check that the server answers; return the first id of ``GET /v1/models`` when it lists one."""
    models_url = url[: -len("/completions")] + "/models"
    try:
        response = await client.get(models_url, headers=headers)
    except httpx.HTTPError as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ConnectionError(f"cannot reach {url}: {reason}") from None
    if response.status_code != 200:
        return None
    try:
        return str(response.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


async def arun_benchmark(
    url: str,
    *,
    concurrency: int | None = None,
    request_rate: float | None = None,
    num_requests: int = 64,
    prompt_len: int = 128,
    max_tokens: int = 128,
    model: str | None = None,
    api_key: str | None = None,
    seed: int = 0,
    prompts: Sequence[Prompt] | None = None,
    temperature: float = 0.0,
    extra_body: dict | None = None,
    request_timeout: float = 600.0,
) -> BenchResult:
    """The async form of :func:`run_benchmark`."""
    if (concurrency is None) == (request_rate is None):
        raise ValueError("give exactly one of concurrency (closed loop) or request_rate (Poisson arrivals)")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    for name, value in (("num_requests", num_requests), ("prompt_len", prompt_len), ("max_tokens", max_tokens)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if prompts is not None and len(prompts) == 0:
        raise ValueError("prompts is empty")
    url = completions_url(url)
    arrivals = poisson_arrivals(num_requests, request_rate, seed) if request_rate is not None else None
    chosen = list(prompts) if prompts is not None else make_prompts(num_requests, prompt_len, seed)
    request_prompts = [chosen[i % len(chosen)] for i in range(num_requests)]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(request_timeout, connect=10.0, pool=None)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        model = model or await _discover_model(client, url, headers)
        records = [RequestRecord(i, _estimate_tokens(p)) for i, p in enumerate(request_prompts)]

        def body(i: int) -> dict:
            fields = {"model": model} if model else {}
            fields |= {"prompt": request_prompts[i], "max_tokens": max_tokens, "temperature": temperature}
            fields |= {"stream": True, "stream_options": {"include_usage": True}, **(extra_body or {})}
            return fields

        async def one(i: int) -> None:
            await _send(client, url, body(i), headers, records[i], request_timeout)

        start = time.perf_counter()
        if arrivals is None:
            pending = iter(range(num_requests))  # shared by the clients: each takes the next index when free

            async def client_loop() -> None:
                for i in pending:
                    await one(i)

            await asyncio.gather(*(client_loop() for _ in range(min(concurrency, num_requests))))
        else:
            tasks = []
            for i, offset in enumerate(arrivals):
                delay = start + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return BenchResult(url, model, concurrency, request_rate, max_tokens, duration, records)


def run_benchmark(
    url: str,
    *,
    concurrency: int | None = None,
    request_rate: float | None = None,
    num_requests: int = 64,
    prompt_len: int = 128,
    max_tokens: int = 128,
    model: str | None = None,
    api_key: str | None = None,
    seed: int = 0,
    prompts: Sequence[Prompt] | None = None,
    temperature: float = 0.0,
    extra_body: dict | None = None,
    request_timeout: float = 600.0,
) -> BenchResult:
    """Load ``url`` (a server root or its completions endpoint) and measure it.

    Give ``concurrency`` (closed loop of N clients) or ``request_rate`` (Poisson arrivals, requests/s; ``inf``
    sends all at once). Prompts are ``prompt_len`` random common words unless ``prompts`` (strings or token-id
    lists, used in turn) are given. Without ``model`` the first id of ``GET /v1/models`` is used, if any.
    Raises ConnectionError when the server cannot be reached at all; failed requests are counted, not raised.
    """
    return asyncio.run(
        arun_benchmark(
            url,
            concurrency=concurrency,
            request_rate=request_rate,
            num_requests=num_requests,
            prompt_len=prompt_len,
            max_tokens=max_tokens,
            model=model,
            api_key=api_key,
            seed=seed,
            prompts=prompts,
            temperature=temperature,
            extra_body=extra_body,
            request_timeout=request_timeout,
        )
    )


def _estimate_tokens(prompt: Prompt) -> int:
    return len(prompt.split()) if isinstance(prompt, str) else len(prompt)
