"""The replica front end without Ray: routing rules, and the front over two in-process servers as its replicas."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import httpx
import pytest
import uvicorn

from falconlm.cli import main
from falconlm.server.replica_front import REPLICA_HEADER, FrontSettings, build_front_app
from falconlm.server.replica_pool import ReplicaPool
from falconlm.server.replica_routing import choose_replica, prefix_key, rendezvous_order

from .conftest import API_KEY, MODEL_NAME, free_port

REPLICA_KEY = "replica-secret-456"
SHARED = "You are a careful assistant who answers in short sentences. "  # past PREFIX_CHARS below
PREFIX_CHARS = 40  # the tiny model's context is 128 tokens: short prompts


# ---- routing rules --------------------------------------------------------------------------------------------


def test_prefix_key_reads_the_prompt_of_each_route():
    completion = json.dumps({"model": "m", "prompt": SHARED + "one"}).encode()
    other_suffix = json.dumps({"model": "m", "prompt": [SHARED + "two", "x"]}).encode()
    assert prefix_key("/v1/completions", completion, PREFIX_CHARS) == prefix_key(
        "/v1/completions", other_suffix, PREFIX_CHARS
    )
    assert prefix_key("/v1/completions", completion) != prefix_key("/v1/completions", other_suffix)  # 256 chars
    assert prefix_key("/v1/completions", completion) != prefix_key("/v1/completions", b'{"prompt": "short"}')
    chat = {"model": "m", "messages": [{"role": "system", "content": SHARED}, {"role": "user", "content": "a"}]}
    chat_b = {**chat, "messages": [*chat["messages"][:1], {"role": "user", "content": "b"}]}
    key = prefix_key("/v1/chat/completions", json.dumps(chat).encode(), PREFIX_CHARS)
    assert key is not None and key == prefix_key("/v1/chat/completions", json.dumps(chat_b).encode(), PREFIX_CHARS)
    assert prefix_key("/v1/completions", b'{"prompt": [1, 2, 3]}') != prefix_key(
        "/v1/completions", b'{"prompt": [1, 2, 4]}'
    )
    assert prefix_key("/v1/embeddings", b'{"input": "hello"}') is not None
    for path, body in [("/v1/models", b""), ("/v1/completions", b"not json"), ("/v1/completions", b"[1]")]:
        assert prefix_key(path, body) is None


def test_rendezvous_moves_only_the_keys_of_a_replica_that_leaves():
    keys = [f"prefix {i}".encode() for i in range(200)]
    before = {key: rendezvous_order(key, [0, 1, 2])[0] for key in keys}
    after = {key: rendezvous_order(key, [0, 2])[0] for key in keys}
    assert set(Counter(before.values())) == {0, 1, 2}  # every replica gets keys
    for key in keys:
        if before[key] != 1:
            assert after[key] == before[key]  # keys of replicas that stayed do not move
    assert rendezvous_order(b"x", [0, 1, 2]) == rendezvous_order(b"x", [2, 1, 0])  # independent of the order


def test_bounded_loads_spill_a_hot_prefix_and_send_keyless_requests_to_the_least_loaded():
    key = b"hot prefix"
    home = rendezvous_order(key, [0, 1])[0]
    other = 1 - home
    assert choose_replica(key, {home: 5, other: 0}, floor=16) == home  # below the floor: stay for the cache
    assert choose_replica(key, {home: 16, other: 0}, floor=16) == other  # full batch, idle neighbour: spill
    assert choose_replica(key, {home: 16, other: 15}, floor=16) == home  # both busy: keep the cache hit
    assert choose_replica(key, {home: 30, other: 30}, floor=16) == home
    assert choose_replica(None, {0: 3, 1: 1, 2: 2}) == 1
    with pytest.raises(ValueError):
        choose_replica(key, {})


# ---- the front over two live servers --------------------------------------------------------------------------


class Front:
    def __init__(self, pool: ReplicaPool, settings: FrontSettings) -> None:
        self.pool = pool
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(build_front_app(pool, settings), host="127.0.0.1", port=self.port, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the front did not start"
            time.sleep(0.02)

    def wait_ready(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.pool.ready) != count:
            assert time.monotonic() < deadline, f"{len(self.pool.ready)} replicas ready, expected {count}"
            time.sleep(0.05)

    def http(self, key: str | None = API_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def replicas(start_server):
    return [start_server(api_keys=(REPLICA_KEY,), max_num_seqs=16) for _ in range(2)]


@pytest.fixture(scope="module")
def front(replicas):
    pool = ReplicaPool([lambda r=r: r.url for r in replicas], health_interval=0.2)
    front = Front(pool, FrontSettings(replica_key=REPLICA_KEY, api_keys=(API_KEY,), prefix_chars=PREFIX_CHARS))
    front.wait_ready(2)
    yield front
    front.stop()


def test_front_answers_like_a_single_server(front, server):
    body = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    with front.http() as client, server.http() as direct:
        via_front = client.post("/v1/completions", json=body)
        assert via_front.status_code == 200, via_front.text
        assert via_front.headers[REPLICA_HEADER] in {"0", "1"}
        assert (
            via_front.json()["choices"][0]["text"]
            == direct.post("/v1/completions", json=body).json()["choices"][0]["text"]
        )
        stream = {**body, "stream": True}
        with client.stream("POST", "/v1/completions", json=stream) as streamed:
            assert streamed.headers["content-type"].startswith("text/event-stream")
            events = [line for line in streamed.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1])
        assert text == via_front.json()["choices"][0]["text"]
        bad = client.post("/v1/completions", json={**body, "max_tokens": -1})  # the replica's own error object
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        assert client.get("/v1/models").json()["data"][0]["id"] == MODEL_NAME
        assert client.get("/no/such/route").status_code == 404
        for model_id in (MODEL_NAME, "other%2Fmodel"):  # the path goes on as the client encoded it
            assert client.get(f"/v1/models/{model_id}").status_code == direct.get(f"/v1/models/{model_id}").status_code


def test_front_checks_keys_and_keeps_health_open(front):
    with front.http(key=None) as anonymous, front.http(key="wrong") as wrong:
        assert anonymous.post("/v1/completions", json={"prompt": "a"}).status_code == 401
        assert wrong.get("/v1/models").status_code == 401
        assert wrong.get("/metrics").status_code == 401
        assert anonymous.get("/health").json() == {"status": "ok", "replicas_ready": 2, "replicas": 2}
    with front.http(key=REPLICA_KEY) as replica_key:  # the replicas' key is not a client key
        assert replica_key.get("/v1/models").status_code == 401


def test_front_routes_by_prefix_and_counts_per_replica(front):
    body = {"model": MODEL_NAME, "max_tokens": 2, "temperature": 0}
    with front.http() as client:

        def replica_of(prompt: str) -> str:
            answer = client.post("/v1/completions", json={**body, "prompt": prompt})
            assert answer.status_code == 200, answer.text
            return answer.headers[REPLICA_HEADER]

        assert len({replica_of(SHARED + suffix) for suffix in ("a", "b", "c", "d")}) == 1
        spread = {replica_of(f"{i} different start") for i in range(12)}
        assert spread == {"0", "1"}
        metrics = client.get("/metrics").text
    assert 'falconlm_replica_routed_requests_total{replica="0"}' in metrics
    assert 'falconlm_replica_ready{replica="1"} 1.0' in metrics
    finished = [line for line in metrics.splitlines() if line.startswith("falconlm_requests_total")]
    assert any('replica="0"' in line for line in finished) and any('replica="1"' in line for line in finished)


def test_front_keeps_answering_when_a_replica_goes_away(start_server):
    first, second = (start_server(api_keys=(REPLICA_KEY,)) for _ in range(2))
    pool = ReplicaPool([lambda: first.url, lambda: second.url], health_interval=0.2)
    front = Front(pool, FrontSettings(replica_key=REPLICA_KEY))
    try:
        front.wait_ready(2)
        first.stop()  # connections to it are refused from now on
        body = {"model": MODEL_NAME, "max_tokens": 2, "temperature": 0}
        with front.http(key=None) as client:
            for i in range(6):  # some are routed to the stopped replica before a health check notices
                answer = client.post("/v1/completions", json={**body, "prompt": f"{i} start"})
                assert answer.status_code == 200 and answer.headers[REPLICA_HEADER] == "1"
            front.wait_ready(1)
            assert client.get("/health").json()["replicas_ready"] == 1
            second.stop()
            front.wait_ready(0)
            down = client.get("/health")
            assert down.status_code == 503 and "no replica is ready" in down.json()["error"]["message"]
            refused = client.post("/v1/completions", json={**body, "prompt": "x"})
            assert refused.status_code == 503 and refused.headers["retry-after"]
            text = client.post("/v1/completions", content=b"{}", headers={"content-type": "text/plain"})
            assert text.status_code == 415  # no keys: JSON only, checked by the front itself
    finally:
        front.stop()


def test_without_ray_installed_the_option_is_one_line(monkeypatch, capsys, tiny_checkpoint):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("no ray")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    assert main(["serve", "--model", str(tiny_checkpoint), "--ray-replicas", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'falconlm[ray]'" in err
    assert main(["serve", "--model", str(tiny_checkpoint), "--ray", "auto"]) == 2
    assert "--ray-replicas" in capsys.readouterr().err


def test_a_client_that_leaves_stops_the_replicas_work(slow_server):
    pool = ReplicaPool([lambda: slow_server.url], health_interval=0.2)
    front = Front(pool, FrontSettings(replica_key=REPLICA_KEY))
    body = {"model": MODEL_NAME, "prompt": "Once", "max_tokens": 100, "ignore_eos": True, "temperature": 0}

    def aborted() -> float:
        with slow_server.http() as direct:
            lines = direct.get("/metrics").text.splitlines()
        return float(next(line.split()[-1] for line in lines if line.startswith("falconlm_aborted_requests_total")))

    try:
        front.wait_ready(1)
        before = aborted()
        with (
            front.http(key=None) as client,
            client.stream("POST", "/v1/completions", json={**body, "stream": True}) as s,
        ):
            lines = s.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # generating; now hang up
        slow_server.wait_idle(10)
        assert aborted() == before + 1  # the replica stopped the request, it did not finish it
        with front.http(key=None) as client, pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", json=body, timeout=0.5)  # a non-streaming client that gives up
        slow_server.wait_idle(10)
        assert aborted() == before + 2
        deadline = time.monotonic() + 10
        while pool.replicas[0].in_flight:
            assert time.monotonic() < deadline, "the front still counts the abandoned requests"
            time.sleep(0.05)
    finally:
        front.stop()


def test_batch_api_goes_to_replica_0(start_server, tmp_path):
    import openai

    batch_home = start_server(api_keys=(REPLICA_KEY,), settings={"state_dir": str(tmp_path)})
    other = start_server(api_keys=(REPLICA_KEY,))
    pool = ReplicaPool([lambda: batch_home.url, lambda: other.url], health_interval=0.2)
    front = Front(pool, FrontSettings(replica_key=REPLICA_KEY, api_keys=(API_KEY,)))
    client = openai.OpenAI(base_url=f"{front.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    lines = [
        json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                    "body": {"model": MODEL_NAME, "prompt": f"{i} fox", "max_tokens": 3, "temperature": 0}})
        for i in range(3)
    ]  # fmt: skip
    try:
        front.wait_ready(2)
        upload = client.files.with_raw_response.create(file=("in.jsonl", "\n".join(lines).encode()), purpose="batch")
        assert upload.headers[REPLICA_HEADER] == "0"
        batch = client.batches.create(
            input_file_id=upload.parse().id, endpoint="/v1/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 60
        while (batch := client.batches.retrieve(batch.id)).status not in {"completed", "failed"}:
            assert time.monotonic() < deadline, f"the batch is still {batch.status}"
            time.sleep(0.1)
        assert batch.status == "completed" and batch.request_counts.completed == 3
        output = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
        assert sorted(row["custom_id"] for row in output) == ["r0", "r1", "r2"]
        batch_home.stop()
        front.wait_ready(1)
        with front.http() as http:
            down = http.get("/v1/batches")
            assert down.status_code == 503 and "replica 0" in down.json()["error"]["message"]
            assert (
                http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "a", "max_tokens": 1}).status_code
                == 200
            )
    finally:
        front.stop()


def test_replicas_that_cannot_all_be_placed_are_an_error_not_a_wait():
    from falconlm.cli.serve_ray import check_resources

    check_resources({"CPU": 8.0, "GPU": 2.0}, count=2, cpus=4, gpus=1)
    with pytest.raises(ValueError, match=r"needs 3 GPUs .* has 2"):
        check_resources({"CPU": 64.0, "GPU": 2.0}, count=3, cpus=1, gpus=1)
    with pytest.raises(ValueError, match="needs 8 CPUs; the Ray cluster has 6"):
        check_resources({"CPU": 6.0}, count=2, cpus=4, gpus=0)
    from falconlm.cli.serve_ray import check_reachable

    port = free_port()  # nothing listens there
    with pytest.raises(ValueError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}"):
        check_reachable(f"127.0.0.1:{port}")
    check_reachable("auto")  # left to Ray
