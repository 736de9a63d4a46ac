"""Live servers for the server tests: uvicorn in a thread on 127.0.0.1 and a free port, over the tiny checkpoint."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from falconlm.cli.serve_http import build_server_app
from falconlm.engine.async_engine import AsyncEngine
from falconlm.engine.engine import Engine, EngineConfig
from falconlm.model.falcon import FalconForCausalLM
from falconlm.server import ServerSettings
from falconlm.tokenizer import Tokenizer

API_KEY = "test-key-123"
MODEL_NAME = "tiny-falcon"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_engine(checkpoint: Path, **config) -> Engine:
    model = FalconForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.eval()
    return Engine(model, Tokenizer.from_pretrained(checkpoint), EngineConfig(**config))


@pytest.fixture
def engine(tiny_checkpoint) -> Iterator[AsyncEngine]:
    """A started AsyncEngine on the tiny checkpoint (4 sequences at a time), shut down after the test."""
    async_engine = AsyncEngine(load_engine(tiny_checkpoint, max_num_seqs=4))
    async_engine.start()
    assert async_engine.wait_ready(30)
    yield async_engine
    async_engine.shutdown(timeout=1)


class LiveServer:
    """uvicorn serving ``build_server_app(engine, settings)`` (the app as `falconlm serve` composes it) in a thread."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            build_server_app(engine, settings), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def headers(self) -> dict[str, str]:
        keys = self.settings.api_keys
        return {"Authorization": f"Bearer {keys[0]}"} if keys else {}

    def http(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=60, **kwargs)

    def openai(self, **kwargs):
        import openai

        key = self.settings.api_keys[0] if self.settings.api_keys else "unused"
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60, **kwargs)

    def async_openai(self, **kwargs):
        import openai

        key = self.settings.api_keys[0] if self.settings.api_keys else "unused"
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60, **kwargs)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until no request is running or waiting and every KV block is free (fails the test otherwise)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.engine.stats
            if stats.num_running == 0 and stats.num_waiting == 0 and stats.num_blocks_in_use == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the engine is not idle after {timeout}s: {stats}")
            time.sleep(0.02)


ServerFactory = Callable[..., LiveServer]


@pytest.fixture(scope="session")
def start_server(tiny_checkpoint: Path) -> Iterator[ServerFactory]:
    """``start_server(api_keys=(), max_body_bytes=..., settings={...}, **engine_config)`` -> a running LiveServer
    (stopped at exit); ``settings`` holds further ServerSettings fields."""
    servers: list[LiveServer] = []

    def start(
        api_keys: tuple[str, ...] = (), max_body_bytes: int = 1 << 20, settings: dict | None = None, **config
    ) -> LiveServer:
        engine = AsyncEngine(load_engine(tiny_checkpoint, **config))
        settings = ServerSettings(
            served_model_names=(MODEL_NAME,),
            model_path=str(tiny_checkpoint),
            api_keys=api_keys,
            max_body_bytes=max_body_bytes,
            **(settings or {}),
        )
        server = LiveServer(engine, settings).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server: ServerFactory) -> LiveServer:
    """The shared server: API key required, 16 sequences, prefix caching on."""
    return start_server(api_keys=(API_KEY,), max_num_seqs=16)


@pytest.fixture(scope="session")
def slow_server(start_server: ServerFactory) -> LiveServer:
    """A server whose every model step takes at least 10 ms (a decode run's steps each), so a long request is surely
    still running."""
    server = start_server(max_num_seqs=16)
    runner = server.engine.engine.runner
    execute = runner.execute

    def slow_execute(step):
        time.sleep(0.01 * step.num_steps)
        return execute(step)

    runner.execute = slow_execute
    return server
