"""``serve --ray-replicas``: two replicas as Ray actors on a local Ray instance (one for the module) behind the
front, compared with a single server, routed by prefix, and surviving the loss of one replica."""

from __future__ import annotations

import json
import time

import pytest

from falconlm.cli import build_parser
from falconlm.server.replica_front import REPLICA_HEADER, FrontSettings
from falconlm.server.replica_pool import ReplicaPool

from .conftest import API_KEY, MODEL_NAME
from .test_replica_front import PREFIX_CHARS, SHARED, Front

ray = pytest.importorskip("ray", reason="needs the 'ray' extra")
from falconlm.cli.serve_ray import RayReplicas, connect_ray  # noqa: E402

pytestmark = pytest.mark.slow
REPLICA_KEY = "ray-replica-secret"


@pytest.fixture(scope="module")
def ray_front(tiny_checkpoint):
    """The front over two Ray replicas of the tiny checkpoint (float32, one thread each), both ready."""
    argv = ["serve", "--model", str(tiny_checkpoint), "--dtype", "float32", "--threads", "1", "--ray-replicas", "2"]
    args = build_parser().parse_args([*argv, "--served-model-name", MODEL_NAME, "--log-level", "warning"])
    started = connect_ray(ray, None, num_cpus=2)  # the workers get PYTHONPATH=this checkout from connect_ray
    replicas = None
    front = None
    try:
        replicas = RayReplicas(ray, args, 2, REPLICA_KEY, host="127.0.0.1")
        pool = ReplicaPool(replicas.locators(), health_interval=0.3)
        front = Front(pool, FrontSettings(replica_key=REPLICA_KEY, api_keys=(API_KEY,), prefix_chars=PREFIX_CHARS))
        front.wait_ready(2, timeout=180)
        front.replicas = replicas
        yield front
    finally:
        if front is not None:
            front.stop()
        if replicas is not None:
            replicas.stop(5)
        if started:
            ray.shutdown()


def test_answers_equal_a_single_server(ray_front, server):
    completion = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hello fox"}], "max_tokens": 8}
    with ray_front.http() as client, server.http() as direct:
        for path, body in [("/v1/completions", completion), ("/v1/chat/completions", {**chat, "temperature": 0})]:
            via_front, single = client.post(path, json=body), direct.post(path, json=body)
            assert via_front.status_code == 200, via_front.text
            choice, expected = via_front.json()["choices"][0], single.json()["choices"][0]
            assert choice.get("text", choice.get("message")) == expected.get("text", expected.get("message"))
        with client.stream("POST", "/v1/chat/completions", json={**chat, "temperature": 0, "stream": True}) as s:
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        streamed = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
        assert (
            streamed
            == direct.post("/v1/chat/completions", json={**chat, "temperature": 0}).json()["choices"][0]["message"][
                "content"
            ]
        )


def test_shared_prefixes_meet_on_one_replica_and_others_spread(ray_front):
    body = {"model": MODEL_NAME, "max_tokens": 2, "temperature": 0}
    with ray_front.http() as client:

        def replica_of(prompt: str) -> str:
            answer = client.post("/v1/completions", json={**body, "prompt": prompt})
            assert answer.status_code == 200, answer.text
            return answer.headers[REPLICA_HEADER]

        assert len({replica_of(SHARED + suffix) for suffix in ("one", "two", "three")}) == 1
        assert {replica_of(f"{i} another beginning") for i in range(10)} == {"0", "1"}
        metrics = client.get("/metrics").text
    for replica in ("0", "1"):
        assert f'falconlm_replica_routed_requests_total{{replica="{replica}"}}' in metrics


def test_keys_on_the_front_and_health_open(ray_front):
    with ray_front.http(key=None) as anonymous:
        assert anonymous.get("/v1/models").status_code == 401
        assert anonymous.post("/v1/completions", json={"prompt": "a"}).status_code == 401
        assert anonymous.get("/health").json()["replicas_ready"] == 2


def test_a_killed_replica_leaves_routing_and_comes_back(ray_front):
    pool = ray_front.pool
    ray_front.replicas.kill(0)
    body = {"model": MODEL_NAME, "max_tokens": 2, "temperature": 0}
    with ray_front.http() as client:
        for i in range(6):
            answer = client.post("/v1/completions", json={**body, "prompt": f"{i} after the kill"})
            assert answer.status_code == 200, answer.text
        deadline = time.monotonic() + 180
        seen_down, routed_while_down = False, 0
        while True:  # out of routing while Ray restarts it (and requests still succeed), then back in
            ready = client.get("/health").json()["replicas_ready"]
            if ready == 1:
                seen_down = True
                assert pool.replicas[1].ready  # the one that is left is the other one
                down_before = not pool.replicas[0].ready
                answer = client.post("/v1/completions", json={**body, "prompt": f"{time.monotonic()} meanwhile"})
                assert answer.status_code == 200, answer.text
                # Only while replica 0 stayed down for the whole request: it may come back between the health read
                # and the routing, and then either replica may rightly answer.
                if down_before and not pool.replicas[0].ready:
                    assert answer.headers[REPLICA_HEADER] == "1", answer.text
                    routed_while_down += 1
            elif seen_down:
                break
            assert time.monotonic() < deadline, "the killed replica did not leave and come back"
            time.sleep(0.1)
        assert routed_while_down > 0, "no request was routed while the killed replica was down"
        assert client.get("/health").json()["replicas_ready"] == 2
