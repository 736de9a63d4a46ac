"""The Files and Batches API through the openai client, on the real server app with the batch routes mounted."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from falconlm.cli.serve_http import build_server_app
from falconlm.engine.async_engine import AsyncEngine
from falconlm.engine.engine import Engine, EngineConfig
from falconlm.model.falcon import FalconForCausalLM
from falconlm.server import ServerSettings
from falconlm.tokenizer import Tokenizer

MODEL = "tiny-falcon"


class BatchServer:
    """uvicorn in a thread serving the app plus the batch routes over ``state_dir``."""

    def __init__(
        self,
        checkpoint: Path,
        state_dir: Path,
        step_delay: float = 0.0,
        max_upload_bytes: int = 1 << 20,
        max_state_bytes: int = 1 << 30,
    ) -> None:
        self.state_dir = state_dir
        model = FalconForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        engine = Engine(model, Tokenizer.from_pretrained(checkpoint), EngineConfig(max_num_seqs=8))
        if step_delay:  # a slow engine: a batch takes seconds whatever the machine
            step = engine.step
            engine.step = lambda: (time.sleep(step_delay), step())[1]
        self.engine = AsyncEngine(engine)
        settings = ServerSettings(
            served_model_names=(MODEL,),
            model_path=str(checkpoint),
            state_dir=str(state_dir),
            max_upload_bytes=max_upload_bytes,
            max_state_bytes=max_state_bytes,
        )
        app = build_server_app(self.engine, settings)  # mounts the batch routes because state_dir is set
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="x", max_retries=0)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def line(custom_id: str, prompt: str, url: str = "/v1/completions", **body) -> str:
    payload = {"messages": [{"role": "user", "content": prompt}]} if "chat" in url else {"prompt": prompt}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": {**payload, **body}})


def wait_until(client: openai.OpenAI, batch_id: str, done, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if done(batch):
            return batch
        assert time.monotonic() < deadline, f"batch stuck: {batch}"
        time.sleep(0.05)


def jsonl(client: openai.OpenAI, file_id: str) -> list[dict]:
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


@pytest.fixture
def server(tiny_checkpoint, tmp_path):
    live = BatchServer(tiny_checkpoint, tmp_path / "state", max_upload_bytes=64 * 1024)
    yield live
    live.stop()


def test_upload_create_poll_download_list_and_cancel(server):
    client = server.client
    lines = [line(f"r{i}", f"Once upon a time {i}", max_tokens=3, temperature=0, model=MODEL) for i in range(12)]
    lines += [
        line("other-model", "hi", model="gpt-4o-mini"),
        line("chat", "hi", url="/v1/chat/completions"),  # not this batch's endpoint
        "{oops",
        line("r0", "a duplicate"),
    ]
    upload = client.files.create(file=("requests.jsonl", "\n".join(lines).encode()), purpose="batch")
    assert upload.purpose == "batch" and upload.filename == "requests.jsonl" and upload.bytes > 0
    assert client.files.retrieve(upload.id).id == upload.id

    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h", metadata={"team": "rag"}
    )
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"team": "rag"}
    batch = wait_until(client, batch.id, lambda b: b.status == "completed")
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (16, 12, 4)
    assert batch.completed_at >= batch.in_progress_at >= batch.created_at
    out = jsonl(client, batch.output_file_id)
    assert [o["custom_id"] for o in out] == [f"r{i}" for i in range(12)]
    assert all(o["response"]["body"]["usage"]["completion_tokens"] == 3 for o in out)
    errors = {(e["custom_id"], e["error"]["code"]) for e in jsonl(client, batch.error_file_id)}
    assert errors == {
        ("other-model", "model_not_found"),
        ("chat", "invalid_url"),
        (None, "invalid_json"),
        ("r0", "duplicate_custom_id"),
    }
    assert batch.id in [b.id for b in client.batches.list()]
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"

    slow = client.files.create(
        file=("slow.jsonl", "\n".join(line(f"s{i}", "The fox", max_tokens=40) for i in range(60)).encode()),
        purpose="batch",
    )
    cancelled = client.batches.create(input_file_id=slow.id, endpoint="/v1/completions", completion_window="24h")
    client.batches.cancel(cancelled.id)
    cancelled = wait_until(client, cancelled.id, lambda b: b.status == "cancelled")
    answered = jsonl(client, cancelled.output_file_id) if cancelled.output_file_id else []
    left = jsonl(client, cancelled.error_file_id)
    assert Counter(x["custom_id"] for x in answered + left) == Counter(f"s{i}" for i in range(60))
    assert {x["error"]["code"] for x in left} == {"batch_cancelled"}


def test_bad_uploads_and_ids(server):
    client, base = server.client, f"http://127.0.0.1:{server.port}"
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("a.jsonl", b"{}"), purpose="fine-tune")
    with pytest.raises(openai.APIStatusError) as exc:
        client.files.create(file=("big.jsonl", b"x" * (100 * 1024)), purpose="batch")
    assert exc.value.status_code == 413
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-../../batch.db")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.BadRequestError, match="no batch input file"):
        client.batches.create(input_file_id="file-" + "0" * 24, endpoint="/v1/completions", completion_window="24h")
    assert httpx.get(f"{base}/v1/files/..%2F..%2Fbatch.db/content").status_code == 404
    as_json = httpx.post(f"{base}/v1/files", json={"purpose": "batch", "file": "x"})
    assert as_json.status_code == 400 and "multipart/form-data" in as_json.json()["error"]["message"]
    upload = client.files.create(file=("../../etc/passwd", b""), purpose="batch")
    assert upload.filename == "passwd" and upload.id.startswith("file-")
    assert not any("passwd" in p.name for p in server.state_dir.rglob("*"))


def test_restart_mid_batch_resumes_and_answers_each_request_once(tiny_checkpoint, tmp_path):
    first = BatchServer(tiny_checkpoint, tmp_path / "state", step_delay=0.02)  # the batch takes 2 s or more
    total = 80
    requests = [line(f"q{i}", f"The bear {i}", max_tokens=10, temperature=0, ignore_eos=True) for i in range(total)]
    upload = first.client.files.create(file=("q.jsonl", "\n".join(requests).encode()), purpose="batch")
    batch = first.client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
    wait_until(first.client, batch.id, lambda b: b.request_counts.completed >= 8)
    first.stop()

    second = BatchServer(tiny_checkpoint, tmp_path / "state")
    try:
        resumed = second.client.batches.retrieve(batch.id)
        assert resumed.status == "in_progress" and 8 <= resumed.request_counts.completed < total, resumed
        done = wait_until(second.client, batch.id, lambda b: b.status == "completed")
        assert done.request_counts.completed == total and done.error_file_id is None
        out = jsonl(second.client, done.output_file_id)
        assert Counter(o["custom_id"] for o in out) == Counter(f"q{i}" for i in range(total))
    finally:
        second.stop()


def test_poison_lines_do_not_fail_a_server_batch(server):
    client = server.client
    deep = "[" * 5000 + "]" * 5000
    lines = [
        line("ok0", "Once upon a time", max_tokens=2, model=MODEL),
        json.dumps(
            {"custom_id": "surrogate", "method": "POST", "url": "/v1/completions", "body": {"prompt": "\udfff"}}
        ),
        '{"custom_id": "deep", "method": "POST", "url": "/v1/completions", "body": {"prompt": ' + deep + "}}",
        line("ok1", "The fox", max_tokens=2, model=MODEL),
    ]
    upload = client.files.create(file=("poison.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
    batch = wait_until(client, batch.id, lambda b: b.status not in ("validating", "in_progress", "finalizing"))
    assert batch.status == "completed", batch
    assert [o["custom_id"] for o in jsonl(client, batch.output_file_id)] == ["ok0", "ok1"]
    errors = [(e["custom_id"], e["error"]["code"]) for e in jsonl(client, batch.error_file_id)]
    assert errors == [("surrogate", "invalid_body"), ("deep", "invalid_json")]


def test_uploads_past_the_state_quota_get_413(tiny_checkpoint, tmp_path):
    live = BatchServer(tiny_checkpoint, tmp_path / "state", max_upload_bytes=64 * 1024, max_state_bytes=512 * 1024)
    try:
        client, base = live.client, f"http://127.0.0.1:{live.port}"
        kept = [client.files.create(file=("0.jsonl", b"x" * 60_000), purpose="batch")]
        while len(kept) < 12:  # the quota counts the database too, so the exact count of files varies
            response = httpx.post(
                f"{base}/v1/files", files={"file": ("n.jsonl", b"x" * 60_000)}, data={"purpose": "batch"}
            )
            if response.status_code != 200:
                break
            kept.append(client.files.retrieve(response.json()["id"]))
        error = response.json()["error"]
        assert response.status_code == 413 and error["code"] == "quota_exceeded" and "quota" in error["message"]
        assert error["type"] == "invalid_request_error" and 2 <= len(kept) <= 8
        with pytest.raises(openai.APIStatusError) as exc:
            client.files.create(file=("more.jsonl", b"x" * 60_000), purpose="batch")
        assert exc.value.status_code == 413
        client.files.delete(kept[0].id)  # deleting frees room
        assert client.files.create(file=("again.jsonl", b"x" * 60_000), purpose="batch").bytes == 60_000
    finally:
        live.stop()


def test_upload_limits_hold_before_and_after_parsing(server):
    """Over the limit by more than the form's overhead: refused from Content-Length, unparsed; just over it: the
    parsed file is refused. Either way a 413 error object and nothing stored."""
    base = f"http://127.0.0.1:{server.port}"
    for size in (100 * 1024, 64 * 1024 + 1):
        response = httpx.post(f"{base}/v1/files", files={"file": ("f.jsonl", b"x" * size)}, data={"purpose": "batch"})
        error = response.json()["error"]
        assert response.status_code == 413 and error["type"] == "invalid_request_error", (size, error)
    assert "upload limit of 65536 bytes" in error["message"]
    exact = httpx.post(f"{base}/v1/files", files={"file": ("f.jsonl", b"x" * 64 * 1024)}, data={"purpose": "batch"})
    assert exact.status_code == 200 and exact.json()["bytes"] == 64 * 1024
    assert [f.id for f in server.client.files.list()] == [exact.json()["id"]]
