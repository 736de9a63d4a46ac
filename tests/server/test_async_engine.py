"""AsyncEngine: streaming, abort when the consumer leaves, failures that fail requests instead of hanging them."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from falconlm.engine.async_engine import AsyncEngine, EngineError, EngineStoppedError
from falconlm.engine.sampling_params import SamplingParams
from falconlm.server import ServerSettings

from .conftest import LiveServer, load_engine

GREEDY = SamplingParams(max_tokens=8, temperature=0)


def _wait_free(engine: AsyncEngine, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.stats.num_blocks_in_use or engine.stats.num_running or engine.stats.num_waiting:
        assert time.monotonic() < deadline, engine.stats
        time.sleep(0.01)


def test_generate_matches_the_offline_engine(engine: AsyncEngine, tiny_checkpoint):
    prompt = engine.tokenizer.encode("Once upon a time")

    async def run() -> tuple[str, list[int]]:
        text, ids = "", []
        async for out in engine.generate("r1", prompt, GREEDY):
            text += out.text
            ids += out.token_ids
        assert out.finished and out.output.text == text and out.output.token_ids == ids
        return text, ids

    text, ids = asyncio.run(run())
    offline = load_engine(tiny_checkpoint).generate([prompt], [GREEDY])[0]
    assert (text, ids) == (offline.text, offline.token_ids)


def test_consumer_that_stops_early_aborts_its_request(engine: AsyncEngine):
    prompt = engine.tokenizer.encode("Once upon a time")
    params = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)

    async def run() -> int:
        seen = 0
        async for _ in engine.generate("early", prompt, params):
            seen += 1
            if seen == 2:
                break
        return seen

    assert asyncio.run(run()) == 2
    _wait_free(engine)
    assert engine.stats.num_steps < 60  # it did not run its 100 tokens


def test_a_failing_step_fails_the_requests_in_flight_and_the_loop_goes_on(engine: AsyncEngine):
    runner = engine.engine.runner
    real_execute = runner.execute
    calls = {"n": 0}

    def failing_once(step):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real_execute(step)

    runner.execute = failing_once
    prompt = engine.tokenizer.encode("Once upon a time")

    async def run(request_id: str) -> str:
        return "".join([out.text async for out in engine.generate(request_id, prompt, GREEDY)])

    with pytest.raises(EngineError, match="boom"):
        asyncio.run(run("fails"))
    _wait_free(engine)
    assert asyncio.run(run("works"))


class _FakeDriver:
    """Stands for rank 0's link to its followers: records whether the group was marked failed or told to stop."""

    keepalive_interval_s = 0.05

    def __init__(self) -> None:
        self.failed = self.stopped = False

    def tick(self) -> None:
        pass

    def fail(self) -> None:
        self.failed = True

    def stop(self) -> None:
        self.stopped = True


def test_under_tensor_parallelism_a_failing_step_stops_the_engine_for_good(tiny_checkpoint):
    """A step that breaks off (a collective in the model failed: another rank died) leaves the ranks out of step;
    the engine stops with ``fatal_error`` rather than failing the requests and going on."""
    offline = load_engine(tiny_checkpoint)
    driver = _FakeDriver()
    offline.parallel_driver = driver

    def broken_collective(step):
        raise RuntimeError("Connection closed by peer")

    offline.runner.execute = broken_collective
    engine = AsyncEngine(offline)
    engine.start()
    assert engine.wait_ready(30)
    prompt = engine.tokenizer.encode("Once upon a time")

    async def run() -> str:
        return "".join([out.text async for out in engine.generate("r", prompt, GREEDY)])

    with pytest.raises(EngineError, match="tensor-parallel step failed"):
        asyncio.run(asyncio.wait_for(run(), timeout=30))
    assert engine.wait_stopped(30)
    assert "Connection closed by peer" in str(engine.fatal_error)
    assert driver.failed and not engine.is_ready


def test_shutdown_fails_requests_in_flight_instead_of_hanging(tiny_checkpoint):
    engine = AsyncEngine(load_engine(tiny_checkpoint))
    engine.start()
    assert engine.wait_ready(30)
    prompt = engine.tokenizer.encode("Once upon a time")
    params = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)

    async def run() -> None:
        stream = await engine.add([("long", prompt, params)])
        await stream.__anext__()
        await asyncio.to_thread(engine.shutdown, 0.0)
        async for _ in stream:
            pass

    with pytest.raises(EngineStoppedError):
        asyncio.run(asyncio.wait_for(run(), timeout=30))
    assert not engine.is_ready
    with pytest.raises(EngineStoppedError):
        asyncio.run(engine.add([("late", prompt, params)]))


def test_health_is_503_while_loading_then_200(tiny_checkpoint):
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return load_engine(tiny_checkpoint)

    server = LiveServer(AsyncEngine(slow_load), ServerSettings(served_model_names=("m",))).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            loading = http.get("/health")
            assert loading.status_code == 503 and loading.headers["Retry-After"] == "1"
            assert "loading" in loading.json()["error"]["message"]
            busy = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert busy.status_code == 503 and busy.json()["error"]["type"]
            release.set()
            assert server.engine.wait_ready(30)
            assert http.get("/health").status_code == 200
            assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    finally:
        release.set()
        server.stop()


def test_load_failure_answers_503_with_the_reason(tiny_checkpoint):
    def broken_load():
        raise FileNotFoundError("no weights here")

    server = LiveServer(AsyncEngine(broken_load), ServerSettings(served_model_names=("m",))).start()
    try:
        assert not server.engine.wait_ready(30)
        with httpx.Client(base_url=server.url, timeout=30) as http:
            health = http.get("/health")
            assert health.status_code == 503 and "no weights here" in health.json()["error"]["message"]
            assert http.post("/v1/completions", json={"prompt": "x"}).status_code == 503
    finally:
        server.stop()
