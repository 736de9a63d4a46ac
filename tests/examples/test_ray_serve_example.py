"""examples/ray_serve: the falconlm server app as Ray Serve replicas answers, streams, checks keys and stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import free_port
from tests.server.test_ray_serve_cli import alive, cmdline, descendants, started_by_ray

pytest.importorskip("ray.serve", reason="needs the ray-serve extra (pip install -e '.[ray-serve]')")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds child processes in /proc"),
]
REPO_ROOT = Path(__file__).resolve().parents[2]


def test_ray_serve_example_serves_two_replicas(tiny_checkpoint):
    port = free_port()
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "examples.ray_serve", "--model", str(tiny_checkpoint), "--num-replicas", "2"]
    command += ["--port", str(port), "--", "--dtype", "float32", "--api-key", "k", "--log-level", "warning"]
    proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            children |= descendants(proc.pid)
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "Ray Serve did not become ready"
            time.sleep(0.5)
        children |= descendants(proc.pid)
        assert any(b"raylet" in cmdline(pid) for pid in children)
        key = {"Authorization": "Bearer k"}
        body = {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
        answer = httpx.post(f"{url}/v1/completions", json=body, headers=key, timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, headers=key, timeout=60) as s:
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == answer.json()["choices"][0]["text"]
        assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, proc.communicate()[1][-3000:]
        deadline = time.monotonic() + 30
        while left := [pid for pid in children if alive(pid)]:
            assert time.monotonic() < deadline, f"processes left behind: {left}"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in children:
            if alive(pid) and started_by_ray(pid):
                os.kill(pid, signal.SIGKILL)
