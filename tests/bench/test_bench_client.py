"""The serve load generator against a fake SSE server on 127.0.0.1, and `falconlm bench serve` errors."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from falconlm.bench.serve_client import completions_url, make_prompts, poisson_arrivals, run_benchmark
from falconlm.cli import main

DEFAULTS = {"ttft": 0.0, "gap": 0.0, "chunks": 3, "usage": True, "prompt_tokens": 7, "completion_tokens": None}


class FakeServer(ThreadingHTTPServer):
    """Streams ``chunks`` OpenAI completion chunks: the first after ``ttft`` s, then one every ``gap`` s.

    A request whose prompt is "fail" gets a 500 error object; "close" ends the stream after one chunk, no [DONE];
    "error" sends an error event after one chunk.
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.config = dict(DEFAULTS)
        self.bodies: list[dict] = []
        self.headers_seen: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: FakeServer

    def log_message(self, *args) -> None:
        pass

    def _json(self, status: int, payload: dict) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _event(self, payload: dict | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        self.wfile.write(f"data: {data}\n\n".encode())

    def do_GET(self) -> None:
        self._json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    def do_POST(self) -> None:
        srv, cfg = self.server, self.server.config
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.bodies.append(body)
            srv.headers_seen.append(dict(self.headers))
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        try:
            if body["prompt"] == "fail" or cfg.get("status", 200) != 200:
                self._json(500, {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()  # HTTP/1.0: the body ends when the connection closes
            time.sleep(cfg["ttft"])
            for k in range(cfg["chunks"]):
                if k:
                    time.sleep(cfg["gap"])
                self._event({"object": "text_completion", "choices": [{"index": 0, "text": f" w{k}"}]})
                if body["prompt"] == "close":
                    return
                if body["prompt"] == "error":
                    self._event({"error": {"message": "engine died", "type": "server_error", "code": 500}})
                    return
            if cfg["usage"]:
                completion = cfg["completion_tokens"] or cfg["chunks"]
                usage = {"prompt_tokens": cfg["prompt_tokens"], "completion_tokens": completion}
                self._event({"object": "text_completion", "choices": [], "usage": usage})
            self._event("[DONE]")
        finally:
            with srv.lock:
                srv.in_flight -= 1


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def server(fake: FakeServer) -> FakeServer:
    fake.config = dict(DEFAULTS)
    fake.bodies.clear()
    fake.headers_seen.clear()
    fake.max_in_flight = 0
    return fake


def test_ttft_tpot_itl_follow_known_chunk_timings(server):
    server.config |= {"ttft": 0.12, "gap": 0.05, "chunks": 5}
    result = run_benchmark(server.url, concurrency=2, num_requests=2, prompt_len=8, max_tokens=5)
    assert result.completed == 2 and result.failed == 0
    for r in result.records:
        assert r.output_tokens == 5 and r.text == " w0 w1 w2 w3 w4"
        assert 0.11 <= r.ttft <= 0.25
        assert r.tpot == pytest.approx((r.e2e - r.ttft) / 4)
        assert len(r.itls) == 4 and all(0.04 <= gap <= 0.15 for gap in r.itls)
    d = result.to_dict()
    assert 110 <= d["ttft_ms"]["median"] <= 250
    assert 45 <= d["tpot_ms"]["mean"] <= 150 and 45 <= d["itl_ms"]["median"] <= 150
    assert d["e2e_latency_ms"]["mean"] >= d["ttft_ms"]["mean"] + 190
    assert d["total_output_tokens"] == 10 and d["total_prompt_tokens"] == 14
    assert d["output_throughput"] == pytest.approx(10 / d["duration_s"])
    assert d["total_token_throughput"] == pytest.approx(24 / d["duration_s"])
    assert "TTFT (ms)" in result.table() and "2 completed, 0 failed" in result.table()
    json.dumps(d, allow_nan=False)


def test_usage_chunk_gives_token_counts_else_chunks_are_counted(server):
    server.config |= {"chunks": 3, "completion_tokens": 9, "gap": 0.02}
    (r,) = run_benchmark(server.url, concurrency=1, num_requests=1, prompt_len=4, max_tokens=9).records
    assert len(r.chunk_times) == 3 and r.output_tokens == 9 and r.input_tokens == 7
    assert r.tpot == pytest.approx((r.e2e - r.ttft) / 8)
    server.config |= {"usage": False}
    (r,) = run_benchmark(server.url, concurrency=1, num_requests=1, prompt_len=4, max_tokens=9).records
    assert r.output_tokens == 3 and r.input_tokens == 4  # no usage: chunks and the prompt's word count


def test_request_body_model_key_and_token_prompts(server):
    prompts = [[5, 6, 7], "hello there"]
    run_benchmark(server.url + "/v1", concurrency=1, num_requests=3, max_tokens=4, api_key="k1", prompts=prompts)
    assert [b["prompt"] for b in server.bodies] == [[5, 6, 7], "hello there", [5, 6, 7]]
    body = server.bodies[0]
    assert body["model"] == "fake-model" and body["max_tokens"] == 4 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert all(h["Authorization"] == "Bearer k1" for h in server.headers_seen)


def test_failures_are_counted_not_raised(server):
    prompts = ["ok", "fail", "close", "error", "ok"]
    result = run_benchmark(server.url, concurrency=2, num_requests=5, max_tokens=3, prompts=prompts)
    assert result.completed == 2 and result.failed == 3
    errors = result.errors()
    assert errors == {"HTTP 500: boom": 1, "stream ended before data: [DONE]": 1, "error event: engine died": 1}
    assert result.to_dict()["total_output_tokens"] == 6  # failed requests count for nothing
    assert "1 x HTTP 500: boom" in result.table()


def test_closed_loop_keeps_n_requests_in_flight(server):
    server.config |= {"ttft": 0.05, "chunks": 1}
    result = run_benchmark(server.url, concurrency=2, num_requests=5, prompt_len=2, max_tokens=1)
    assert result.completed == 5 and len(server.bodies) == 5 and server.max_in_flight == 2


def test_poisson_arrivals_send_the_requested_count(server):
    result = run_benchmark(server.url, request_rate=50.0, num_requests=8, prompt_len=2, max_tokens=3, seed=3)
    assert result.completed == 8 and len(server.bodies) == 8
    offsets = poisson_arrivals(8, 50.0, seed=3)
    start = min(r.send_time for r in result.records)
    for r, offset in zip(result.records, offsets, strict=True):
        assert r.send_time - start >= offset - 0.01
    assert result.duration_s >= offsets[-1]
    assert result.to_dict()["request_rate"] == 50.0 and "Poisson" in result.table()


def test_poisson_schedule_statistics():
    offsets = poisson_arrivals(4000, 10.0, seed=1)
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert offsets[0] == 0.0 and min(gaps) >= 0
    assert sum(gaps) / len(gaps) == pytest.approx(0.1, rel=0.06)
    assert offsets == poisson_arrivals(4000, 10.0, seed=1) != poisson_arrivals(4000, 10.0, seed=2)
    assert poisson_arrivals(3, float("inf")) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        poisson_arrivals(3, 0.0)


def test_prompts_and_urls():
    prompts = make_prompts(3, 50, seed=0)
    assert len(prompts) == 3 and len(set(prompts)) == 3 and all(len(p.split()) == 50 for p in prompts)
    assert prompts == make_prompts(3, 50, seed=0)
    assert completions_url("127.0.0.1:8000") == "http://127.0.0.1:8000/v1/completions"
    assert completions_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000/v1/completions"
    assert completions_url("http://h/v1/completions") == "http://h/v1/completions"
    with pytest.raises(ValueError):
        completions_url("ftp://h")
    with pytest.raises(ValueError):
        run_benchmark("http://127.0.0.1:1", concurrency=2, request_rate=1.0, num_requests=1)


# ---- the CLI ---------------------------------------------------------------------------------------------------


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--concurrency", "2", "--request-rate", "1"], "not allowed with"),
        (["--concurrency", "0"], "must be >= 1"),
        (["--request-rate", "fast"], "expected a number"),
        (["--num-requests", "-3"], "must be >= 1"),
        ([], "--url"),
    ],
)
def test_cli_argument_errors(args, needle, capsys):
    url = [] if not args else ["--url", "http://127.0.0.1:9"]
    with pytest.raises(SystemExit) as exc:
        main(["bench", "serve", *url, *args])
    assert exc.value.code == 2 and needle in _one_line_error(capsys)


def test_cli_unreachable_url_is_one_line(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["bench", "serve", "--url", f"http://127.0.0.1:{port}", "--num-requests", "2"]) == 2
    assert "cannot reach" in _one_line_error(capsys)


def test_cli_json_report_and_all_failed(server, capsys):
    args = ["bench", "serve", "--url", server.url, "--concurrency", "2", "--num-requests", "3", "--max-tokens", "3"]
    assert main([*args, "--json", "--prompt-len", "5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["completed"] == 3 and report["concurrency"] == 2 and report["total_output_tokens"] == 9
    server.config |= {"status": 500}
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "3 failed" in captured.out
    assert "all 3 requests failed; most common error: HTTP 500: boom" in captured.err
