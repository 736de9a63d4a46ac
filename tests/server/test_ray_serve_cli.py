"""``falconlm serve --ray-replicas 2`` as a command: it serves, and SIGTERM stops it with exit 0 leaving no process
(Ray's included) behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import free_port

pytest.importorskip("ray", reason="needs the 'ray' extra")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds child processes in /proc"),
]
REPO_ROOT = Path(__file__).resolve().parents[2]


def descendants(pid: int) -> set[int]:
    """The processes below ``pid`` (children, their children, ...), from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def started_by_ray(pid: int) -> bool:
    """A Ray or falconlm process (not another that took a finished one's pid)."""
    command = cmdline(pid)
    return b"ray" in command or b"falconlm" in command


def test_serve_with_ray_replicas_answers_and_stops_cleanly(tiny_checkpoint):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "falconlm", "serve", "--model", str(tiny_checkpoint), "--dtype", "float32"]
    command += ["--port", str(port), "--api-key", "k", "--ray-replicas", "2", "--threads", "1"]
    command += ["--replica-health-interval", "0.5", "--shutdown-timeout", "5", "--log-level", "warning"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            children |= descendants(proc.pid)
            try:
                health = httpx.get(f"{url}/health", timeout=2)
                if health.status_code == 200 and health.json()["replicas_ready"] == 2:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the replicas did not become ready"
            time.sleep(0.2)
        children |= descendants(proc.pid)
        assert any(b"raylet" in cmdline(pid) for pid in children)  # the local Ray instance is its own
        body = {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
        answer = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer k"}, timeout=60)
        assert answer.status_code == 200 and answer.headers["x-falconlm-replica"] in {"0", "1"}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 401
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, proc.communicate()[1]
        deadline = time.monotonic() + 30
        while left := [pid for pid in children if alive(pid)]:
            assert time.monotonic() < deadline, f"processes left behind: {left}"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in children:  # only what this test started, should the assertions above have failed
            if alive(pid) and started_by_ray(pid):
                os.kill(pid, signal.SIGKILL)
    assert "Traceback" not in proc.communicate()[1]
