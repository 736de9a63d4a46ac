"""``falconlm batch run --ray``: requests spread over Ray actors give the single-process output, exactly once,
when an actor dies mid-job and when the driver is killed and run again; with ``--tensor-parallel-size 2`` each
engine is two actors (ranks), and a rank that dies takes its engine down without losing or doubling a request.

One local Ray instance (4 CPUs, whatever the machine has: 2 engines x 2 ranks x 1 thread) serves the whole
module; in-process runs join it, the killed driver connects to it by address. Its workers inherit PYTHONPATH from
this process, so they import this checkout.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from falconlm.batch.ray_executor import actor_shape
from falconlm.cli import main

from . import ray_fault_workers

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["Once upon a time", "The fox", "A big bear", "Numbers like 123", "The river", "café naïve"]
N_REQUESTS = 48


def build_input(path: Path) -> list[str]:
    """Greedy completions and chats, a few seeded samples, and one bad line; returns the valid custom_ids."""
    lines, ids = [], []
    for i in range(N_REQUESTS):
        custom_id = f"req-{i:02d}"
        body: dict = {"max_tokens": 6 + i % 7, "temperature": 0}
        if i % 8 == 5:
            body.update(temperature=0.9, seed=1000 + i)
        if i % 6 == 1:
            url, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": f"{PROMPTS[i % 6]} {i}"}]
        else:
            url, body["prompt"] = "/v1/completions", f"{PROMPTS[i % 6]} {i}"
        lines.append(json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}))
        ids.append(custom_id)
        if i == 20:
            lines.append("{not json")
    path.write_text("\n".join(lines) + "\n")
    return ids


def run_args(tmp: Path, checkpoint: Path, source: Path, tag: str, *extra: str) -> list[str]:
    return [
        "batch",
        "run",
        str(source),
        "-o",
        str(tmp / f"{tag}-out.jsonl"),
        "--errors",
        str(tmp / f"{tag}-err.jsonl"),
        "--state",
        str(tmp / f"{tag}-state"),
        "--model",
        str(checkpoint),
        "--dtype",
        "float32",
        "--max-num-seqs",
        "4",
        "--max-in-flight",
        "8",
        *extra,
    ]


def answers(path: Path) -> dict[str, dict]:
    """custom_id -> response body without its id and timestamp; fails on a custom_id seen twice."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    counts = Counter(line["custom_id"] for line in lines)
    assert max(counts.values(), default=1) == 1, f"answered more than once: {[c for c, n in counts.items() if n > 1]}"
    out = {}
    for line in lines:
        body = dict(line["response"]["body"])
        body.pop("id"), body.pop("created")
        out[line["custom_id"]] = body
    return out


def error_codes(path: Path) -> list[tuple[str | None, str]]:
    return [(e["custom_id"], e["error"]["code"]) for e in map(json.loads, path.read_text().splitlines())]


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray instance for the module (stopped at its end); its address for drivers in other processes."""
    ray = pytest.importorskip("ray", reason="needs ray (pip install 'falconlm[ray]')")
    saved = dict(os.environ)  # ray.init sets RAY_* variables too: all are put back at the end
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), saved.get("PYTHONPATH")) if p)
    try:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        yield ray.get_runtime_context().gcs_address
    finally:
        started = descendants(os.getpid()) if sys.platform.startswith("linux") else {}  # its GCS, raylet, workers
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)
        deadline = time.monotonic() + 30
        while still_running(started) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in started:  # still here after 30 s: stop them, so that no Ray process outlives the tests
            if still_running({pid: started[pid]}):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_checkpoint):
    """(folder, input, valid custom_ids, single-process answers, single-process error codes)."""
    import torch

    tmp = tmp_path_factory.mktemp("ray-batch")
    source = tmp / "in.jsonl"
    ids = build_input(source)
    threads = torch.get_num_threads()
    try:
        assert main(run_args(tmp, tiny_checkpoint, source, "ref", "--threads", "1")) == 0
    finally:
        torch.set_num_threads(threads)
    reference = answers(tmp / "ref-out.jsonl")
    assert sorted(reference) == ids
    return tmp, source, ids, reference, error_codes(tmp / "ref-err.jsonl")


@pytest.fixture(scope="module")
def tp_job(tmp_path_factory):
    """(folder, input, checkpoint, single-process answers, single-process error codes) for a 40b-shaped model:
    8 query heads in 2 KV groups, so each of 2 ranks holds different heads. Weights spread wide so greedy tokens
    vary from step to step."""
    import torch

    from tests.conftest import make_hf_checkpoint

    tmp = tmp_path_factory.mktemp("ray-tp-batch")
    checkpoint = make_hf_checkpoint(tmp / "falcon-40b", "40b", initializer_range=0.3)
    source = tmp / "in.jsonl"
    ids = build_input(source)
    threads = torch.get_num_threads()
    try:
        assert main(run_args(tmp, checkpoint, source, "ref", "--threads", "1")) == 0
    finally:
        torch.set_num_threads(threads)
    reference = answers(tmp / "ref-out.jsonl")
    assert sorted(reference) == ids
    return tmp, source, checkpoint, reference, error_codes(tmp / "ref-err.jsonl")


@pytest.fixture(autouse=True)
def bounded_waits(monkeypatch):
    """Every Ray wait of an in-process run ends within two minutes (a failure, never a hung test)."""
    from falconlm.batch import ray_executor

    bounded = functools.partial(ray_executor.RayOptions, start_timeout_s=120.0, stall_timeout_s=120.0)
    monkeypatch.setattr(ray_executor, "RayOptions", bounded)


def ray_log(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "falconlm.batch.ray_executor")


def descendants(pid: int) -> dict[int, bytes]:
    """pid -> command line of every live process below ``pid``."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = {}, list(children.get(pid, []))
    while todo:
        child = todo.pop()
        with contextlib.suppress(OSError):
            found[child] = (Path("/proc") / str(child) / "cmdline").read_bytes()
        todo.extend(children.get(child, []))
    return found


def still_running(processes: dict[int, bytes]) -> list[str]:
    """The processes of ``processes`` that are still alive (and not zombies), by command line."""
    alive = []
    for pid, cmdline in processes.items():
        try:
            state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
            same = (Path("/proc") / str(pid) / "cmdline").read_bytes() == cmdline
        except OSError:
            continue
        if same and state != "Z":
            alive.append(cmdline.replace(b"\0", b" ").decode(errors="replace")[:80])
    return alive


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the Ray processes")
def test_ctrl_c_stops_the_local_ray_instance_and_leaves_the_store_consistent(tmp_path, tiny_checkpoint):
    """Runs before the module's shared Ray instance starts: the driver starts (and must stop) its own."""
    pytest.importorskip("ray", reason="needs ray (pip install 'falconlm[ray]')")
    lines = [
        json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions", "body": {"prompt": f"x {i}"}})
        for i in range(400)
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    argv = run_args(tmp_path, tiny_checkpoint, source, "int", "--ray", "--ray-actors", "2", "--threads", "1")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONWARNINGS": "ignore"}
    env.pop("RAY_ADDRESS", None)
    state = tmp_path / "int-state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "falconlm", *argv],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background shell's children ignore it
    )
    try:
        deadline = time.monotonic() + 180
        while finished_in_store(state) < 3:
            assert proc.poll() is None, f"the driver exited early: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "the driver recorded no results"
            time.sleep(0.01)
        ray_processes = descendants(proc.pid)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == 130, stderr
    assert "run the same command again to resume" in stderr
    assert any(b"raylet" in cmd for cmd in ray_processes.values()), "the driver started no local Ray instance"
    deadline = time.monotonic() + 30
    while still_running(ray_processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert still_running(ray_processes) == []
    conn = sqlite3.connect(state / "batch.db")
    try:
        done = conn.execute("SELECT count(*) FROM requests WHERE status = 'done'").fetchone()[0]
        completed, total = conn.execute("SELECT completed, total FROM jobs").fetchone()
    finally:
        conn.close()
    assert 3 <= done == completed < total == len(lines)  # every recorded result counted once; the rest pending


@pytest.mark.slow
def test_ray_run_equals_single_process(ray_address, job, tiny_checkpoint, caplog):
    import ray

    tmp, source, _ids, reference, errors = job
    caplog.set_level(logging.INFO, logger="falconlm.batch.ray_executor")
    argv = run_args(tmp, tiny_checkpoint, source, "ray", "--ray", "--ray-actors", "2", "--threads", "1")
    assert main(argv) == 0
    assert answers(tmp / "ray-out.jsonl") == reference
    assert error_codes(tmp / "ray-err.jsonl") == errors
    shares = [line for line in ray_log(caplog).splitlines() if line.startswith("Ray actor")]
    assert len(shares) == 2 and all(" 0 requests" not in line for line in shares), shares  # both actors worked
    assert ray.is_initialized()  # a Ray instance the run did not start is left running


@pytest.mark.slow
def test_actor_dies_mid_job_and_its_requests_run_elsewhere(ray_address, job, tiny_checkpoint, caplog, monkeypatch):
    from falconlm.batch import ray_executor

    tmp, source, _ids, reference, errors = job
    monkeypatch.setattr(ray_executor.RayCluster, "worker_class", ray_fault_workers.ExitsMidJob)
    caplog.set_level(logging.INFO, logger="falconlm.batch.ray_executor")
    argv = run_args(tmp, tiny_checkpoint, source, "dead", "--ray", "--ray-actors", "2", "--threads", "1")
    assert main(argv) == 0
    assert "Ray actor 0 died" in ray_log(caplog)
    assert answers(tmp / "dead-out.jsonl") == reference  # every custom_id once, as a single process answers it
    assert error_codes(tmp / "dead-err.jsonl") == errors


@pytest.mark.slow
def test_a_request_that_kills_every_actor_is_answered_with_an_error(
    ray_address, job, tiny_checkpoint, caplog, monkeypatch
):
    from falconlm.batch import ray_executor

    tmp, source, _ids, reference, errors = job
    monkeypatch.setattr(ray_executor.RayCluster, "worker_class", ray_fault_workers.DiesOnPoison)
    caplog.set_level(logging.INFO, logger="falconlm.batch.ray_executor")
    argv = run_args(tmp, tiny_checkpoint, source, "poison", "--ray", "--ray-actors", "2", "--threads", "1")
    argv += ["--max-in-flight", "1"]  # one request per actor at a time: only the poison is ever lost
    assert main(argv) == 0
    deaths = [line for line in ray_log(caplog).splitlines() if line.startswith("Ray actor") and " died " in line]
    assert len(deaths) == 3, deaths  # max_attempts, then it is answered with an error line
    poison = ray_fault_workers.POISON
    assert answers(tmp / "poison-out.jsonl") == {k: v for k, v in reference.items() if k != poison}
    expected_errors = sorted([*errors, (poison, "internal_error")], key=str)
    assert sorted(error_codes(tmp / "poison-err.jsonl"), key=str) == expected_errors


@pytest.mark.slow
def test_cancel_mid_job_then_resume(ray_address, job, tiny_checkpoint, monkeypatch):
    from falconlm.batch import ray_executor

    tmp, source, ids, reference, errors = job
    monkeypatch.setattr(ray_executor.RayCluster, "worker_class", ray_fault_workers.Slow)
    argv = run_args(tmp, tiny_checkpoint, source, "cancel", "--ray", "--ray-actors", "2", "--threads", "1")
    argv += ["--max-in-flight", "1"]
    state = tmp / "cancel-state"
    codes: list[int] = []
    run = threading.Thread(target=lambda: codes.append(main(argv)), daemon=True)
    run.start()
    deadline = time.monotonic() + 120
    while finished_in_store(state) < 3:
        assert run.is_alive(), "the run ended before the cancel"
        assert time.monotonic() < deadline, "the run recorded no results"
        time.sleep(0.01)
    assert main(["batch", "cancel", "--state", str(state)]) == 0
    run.join(timeout=120)
    assert not run.is_alive() and codes == [1]  # stopped as cancelled
    done = answers(tmp / "cancel-out.jsonl")
    assert 3 <= len(done) < len(ids)
    assert done == {k: reference[k] for k in done}
    cancelled = [c for c, code in error_codes(tmp / "cancel-err.jsonl") if code == "batch_cancelled"]
    assert sorted([*done, *cancelled]) == ids  # each request either answered or reported cancelled, once

    monkeypatch.setattr(ray_executor.RayCluster, "worker_class", ray_executor.EngineWorker)
    assert main(argv) == 0  # the same command takes the cancelled job up where it stopped
    assert answers(tmp / "cancel-out.jsonl") == reference
    assert error_codes(tmp / "cancel-err.jsonl") == errors


@pytest.mark.slow
def test_tensor_parallel_engines_on_ray_equal_single_process(ray_address, tp_job, caplog):
    tmp, source, checkpoint, reference, errors = tp_job
    caplog.set_level(logging.INFO, logger="falconlm.batch.ray_executor")
    argv = run_args(tmp, checkpoint, source, "tp", "--ray", "--ray-actors", "2", "--tensor-parallel-size", "2")
    assert main([*argv, "--threads", "1"]) == 0
    assert answers(tmp / "tp-out.jsonl") == reference
    assert error_codes(tmp / "tp-err.jsonl") == errors
    shares = [line for line in ray_log(caplog).splitlines() if line.startswith("Ray actor")]
    assert len(shares) == 2 and all(" 0 requests" not in line for line in shares), shares  # both engines worked


@pytest.mark.slow
def test_a_follower_rank_dies_mid_job_and_its_engine_is_replaced(ray_address, tp_job, caplog, monkeypatch):
    from falconlm.batch import ray_executor

    tmp, source, checkpoint, reference, errors = tp_job
    monkeypatch.setattr(ray_executor.RayCluster, "follower_class", ray_fault_workers.FollowerExitsMidJob)
    caplog.set_level(logging.INFO, logger="falconlm.batch.ray_executor")
    argv = run_args(tmp, checkpoint, source, "tpdead", "--ray", "--ray-actors", "2", "--tensor-parallel-size", "2")
    argv += ["--threads", "1", "--distributed-timeout", "60"]  # rank 0 notices within a minute even if gloo waits
    assert main(argv) == 0
    deaths = [line for line in ray_log(caplog).splitlines() if " died " in line]
    assert len(deaths) == 1 and deaths[0].startswith("Ray actor 0 died"), deaths  # rank 0 of engine 0 went too
    assert answers(tmp / "tpdead-out.jsonl") == reference  # every custom_id once, as a single process answers it
    assert error_codes(tmp / "tpdead-err.jsonl") == errors


def finished_in_store(state: Path) -> int:
    try:
        conn = sqlite3.connect(state / "batch.db", timeout=5)
    except sqlite3.OperationalError:
        return 0
    try:
        return conn.execute("SELECT count(*) FROM requests WHERE status != 'pending'").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0
    finally:
        conn.close()


@pytest.mark.slow
def test_driver_killed_mid_job_then_resumed(ray_address, job, tiny_checkpoint):
    tmp, source, ids, reference, errors = job
    state = tmp / "killed-state"
    argv = run_args(tmp, tiny_checkpoint, source, "killed", "--ray", ray_address, "--ray-actors", "2")
    argv += ["--threads", "1", "--max-in-flight", "4"]  # chunks of one request: many small commits
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "falconlm", *argv], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while finished_in_store(state) < 3:
            assert proc.poll() is None, f"the driver exited before the kill: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "the driver recorded no results"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()
    recorded = finished_in_store(state)
    assert 3 <= recorded < len(ids) + 1, f"the kill landed after the job ended ({recorded} recorded)"

    assert main(argv) == 0  # the same command resumes (in this process, on the same cluster)
    assert answers(tmp / "killed-out.jsonl") == reference
    assert error_codes(tmp / "killed-err.jsonl") == errors


def test_ray_flag_without_ray_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    source = tmp_path / "in.jsonl"
    build_input(source)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    code = main(["batch", "run", str(source), "-o", str(tmp_path / "out.jsonl"), "--ray"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "pip install 'falconlm[ray]'" in err, err
    assert not (tmp_path / "out.jsonl.state").exists()  # refused before any work


def test_unreachable_ray_address_is_one_line_and_exit_2(tmp_path, capsys):
    pytest.importorskip("ray", reason="needs ray (pip install 'falconlm[ray]')")
    source = tmp_path / "in.jsonl"
    build_input(source)
    with socket.socket() as sock:  # a port nothing listens on once this closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = main(["batch", "run", str(source), "-o", str(tmp_path / "out.jsonl"), "--ray", f"127.0.0.1:{port}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and f"cannot reach the Ray cluster at 127.0.0.1:{port}" in err, err
    assert not (tmp_path / "out.jsonl.state").exists()


def test_ray_actors_without_ray_is_refused(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    build_input(source)
    assert main(["batch", "run", str(source), "-o", str(tmp_path / "out.jsonl"), "--ray-actors", "2"]) == 2
    assert "--ray-actors needs --ray" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("cpus", "actors", "threads", "shape"),
    [(8, None, None, (2, 4)), (8, None, 2, (4, 2)), (8, 3, None, (3, 2)), (1, None, None, (1, 1)), (2, 4, 1, (4, 1))],
)
def test_actor_shape(cpus, actors, threads, shape):
    assert actor_shape(cpus, actors, threads) == shape


@pytest.mark.parametrize(
    ("cpus", "actors", "threads", "shape"),
    [
        (8, None, None, (2, 2)),
        (8, None, 2, (2, 2)),
        (8, 1, None, (1, 4)),
        (16, None, 1, (8, 1)),
        (1, None, None, (1, 1)),
    ],
)
def test_engine_shape_with_two_ranks(cpus, actors, threads, shape):
    """With 2 ranks an engine takes twice the CPUs: (engines, threads per rank)."""
    assert actor_shape(cpus, actors, threads, ranks=2) == shape


def test_ray_under_torchrun_is_refused(tmp_path, monkeypatch, capsys):
    source = tmp_path / "in.jsonl"
    build_input(source)
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["batch", "run", str(source), "-o", str(tmp_path / "out.jsonl"), "--ray", "--tensor-parallel-size", "2"]
    assert main(argv) == 2
    assert "run it without torchrun" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl.state").exists()
