"""The tensor-parallel engine over gloo on CPU: rank 0 schedules and broadcasts each forward, the other ranks follow.

Two ranks must give what one process gives: greedy tokens through the engine (concurrent requests of different
lengths, chunked prefill, preemption) for a Falcon, a Falcon-Mamba and a Falcon-H1 model; ``generate``, ``serve``
and ``batch run`` under ``torchrun``. A rank that dies ends the others with an error, not a hang. Every process
gets PYTHONPATH set to this repository, every wait has a timeout, and every process is killed at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_hf_checkpoint
from tests.model.h1_checkpoints import save_hf_h1
from tests.model.mamba_checkpoints import save_hf_mamba
from tests.parallel.tp_engine_worker import greedy

pytestmark = pytest.mark.slow  # each test starts several torch processes

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("tp_engine_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
WAIT_S = 240  # the most any launched command may take on a busy machine
PROMPT = "Once upon a time"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> list[str]:
    return [*TORCHRUN, "--nproc-per-node", "2", "--master-port", str(_free_port()), *args]


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=WAIT_S, cwd=ROOT, **kwargs)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=10)


@pytest.fixture(scope="module")
def falcon(tmp_path_factory) -> Path:
    # Weights spread wide so greedy tokens vary from step to step (a flat random model repeats one token).
    return make_hf_checkpoint(tmp_path_factory.mktemp("tp-falcon"), "40b", initializer_range=0.3)


@pytest.fixture(scope="module")
def mamba(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tp-mamba")
    save_hf_mamba(folder)
    return folder


@pytest.fixture(scope="module")
def h1(tmp_path_factory) -> Path:
    return save_hf_h1(tmp_path_factory.mktemp("tp-h1") / "ckpt")


# ---- the engine -------------------------------------------------------------------------------------------------
def test_two_ranks_generate_the_tokens_of_one(falcon, mamba, h1, tmp_path) -> None:
    out = tmp_path / "two.json"
    checkpoints = [str(falcon), str(mamba), str(h1)]
    result = _run(_torchrun(str(WORKER), str(out), *checkpoints))
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads(out.read_text())
    for path in checkpoints:
        one = greedy(path, 1)
        assert two[path]["tokens"] == one["tokens"], path
        assert two[path]["preemptions"] == one["preemptions"]
        for key in ("logprobs", "prompt_logprobs"):  # [logprob, top token ids...] per position
            assert len(two[path][key]) == len(one[key]) > 0
            for got, want in zip(two[path][key], one[key], strict=True):
                assert got[1:] == want[1:] and got[0] == pytest.approx(want[0], abs=1e-4), (path, key)
    assert two[str(falcon)]["preemptions"] > 0  # the small KV pool made the scheduler preempt and recompute
    assert len({t for row in two[str(falcon)]["tokens"] for t in row}) > 5  # the tokens say something


def test_two_ranks_in_deterministic_mode_generate_the_tokens_of_one(falcon, tmp_path) -> None:
    # Deterministic mode makes a step's decode rows and its prompt chunks two forwards; rank 1 repeats each with its
    # head call right after it, so rank 0 must make its head calls in that same order (merging them into one call
    # after both forwards had left the ranks' collectives out of step until the group timed out).
    out = tmp_path / "two.json"
    result = _run(_torchrun(str(WORKER), "--deterministic", str(out), str(falcon)))
    assert result.returncode == 0, result.stderr[-3000:]
    two, one = json.loads(out.read_text())[str(falcon)], greedy(falcon, 1, deterministic=True)
    assert two["tokens"] == one["tokens"]
    for key in ("logprobs", "prompt_logprobs"):
        assert len(two[key]) == len(one[key]) > 0
        for got, want in zip(two[key], one[key], strict=True):
            assert got[1:] == want[1:] and got[0] == pytest.approx(want[0], abs=1e-4), key


# ---- the CLI ----------------------------------------------------------------------------------------------------
def _generate_args(model: Path) -> list[str]:
    return [
        PROMPT,
        "--model",
        str(model),
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--dtype",
        "float32",
        "--device",
        "cpu",
    ]


def test_generate_under_torchrun_prints_the_one_process_text(falcon) -> None:
    one = _run([sys.executable, "-m", "falconlm", "generate", *_generate_args(falcon)])
    assert one.returncode == 0, one.stderr
    two = _run(_torchrun("-m", "falconlm", "generate", *_generate_args(falcon), "--tensor-parallel-size", "2"))
    assert two.returncode == 0, two.stderr[-3000:]  # torchrun exits 0 only when both ranks did
    assert two.stdout == one.stdout  # rank 1 prints nothing
    assert one.stdout.startswith(PROMPT) and len(one.stdout.strip()) > len(PROMPT)


def test_rank_0_failing_before_its_engine_releases_the_followers(falcon) -> None:
    # The follower loads its shard and waits for rank 0's plan; rank 0 refuses the empty prompt and tells it to
    # stop, so both end long before the 600 s timeout (a follower left waiting would make this run time out).
    args = ["", "--model", str(falcon), "--device", "cpu", "--distributed-timeout", "600"]
    result = _run(_torchrun("-m", "falconlm", "generate", *args, "--tensor-parallel-size", "2"))
    assert result.returncode != 0
    assert result.stderr.count("falconlm generate: error: the prompt is empty") == 1
    assert "tensor-parallel group failed" not in result.stderr


def _batch_input(path: Path) -> Path:
    lines = []
    for i, prompt in enumerate(["Once upon a time", "The fox", "Numbers like 123 and", "A"]):
        body = {"model": "m", "prompt": prompt, "max_tokens": 6 + i, "temperature": 0}
        lines.append(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _answers(output: Path) -> dict[str, tuple[str, dict]]:
    """custom_id -> (text, usage) of a batch output file (ids and times differ from run to run)."""
    answers = {}
    for line in output.read_text().splitlines():
        record = json.loads(line)
        body = record["response"]["body"]
        answers[record["custom_id"]] = (body["choices"][0]["text"], body["usage"])
    return answers


def test_batch_run_under_torchrun_writes_the_one_process_output(falcon, tmp_path) -> None:
    source = _batch_input(tmp_path / "in.jsonl")
    common = ["--model", str(falcon), "--dtype", "float32", "--device", "cpu"]
    one = _run(
        [sys.executable, "-m", "falconlm", "batch", "run", str(source), "-o", str(tmp_path / "one.jsonl"), *common]
    )
    assert one.returncode == 0, one.stderr
    two_out = tmp_path / "two.jsonl"
    two = _run(
        _torchrun(
            "-m", "falconlm", "batch", "run", str(source), "-o", str(two_out), *common, "--tensor-parallel-size", "2"
        )
    )
    assert two.returncode == 0, two.stderr[-3000:]
    expected = _answers(tmp_path / "one.jsonl")
    assert len(expected) == 4
    assert _answers(two_out) == expected


# ---- serve ------------------------------------------------------------------------------------------------------
class _Ranks:
    """``falconlm serve`` as rank 0 and rank 1 of a 2-process group, started the way torchrun starts them."""

    def __init__(self, model: Path, port: int, *extra: str) -> None:
        master = str(_free_port())
        self.procs = []
        for rank in range(2):
            env = _env(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE="2",
                LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=master,
            )
            self.procs.append(_spawn(_serve_command(model, port, "--tensor-parallel-size", "2", *extra), env))

    def close(self) -> None:
        for proc in self.procs:
            _kill(proc)


def _serve_command(model: Path, port: int, *extra: str) -> list[str]:
    """``falconlm serve`` of ``model`` on ``port`` as model "m", float32 on CPU, plus ``extra``."""
    return [
        sys.executable, "-m", "falconlm", "serve", "--model", str(model), "--port", str(port),
        "--served-model-name", "m", "--dtype", "float32", "--device", "cpu", *extra,
    ]  # fmt: skip


def _spawn(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    """``command`` in its own session (so ``_kill`` takes its whole group), output captured."""
    return subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _start_one(model: Path, port: int) -> subprocess.Popen:
    return _spawn(_serve_command(model, port), _env())


def _wait_healthy(port: int, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"a rank exited early ({proc.returncode}): {proc.communicate()[1][-3000:]}")
        with suppress(httpx.TransportError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise AssertionError("the server did not become healthy")


def _complete(port: int) -> str:
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 10, "temperature": 0}
    reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


def test_serve_with_two_ranks_answers_like_one_and_stops_on_sigterm(falcon) -> None:
    port = _free_port()
    single = _start_one(falcon, port)
    try:
        _wait_healthy(port, [single])
        expected = _complete(port)
    finally:
        _kill(single)
    port = _free_port()
    ranks = _Ranks(falcon, port, "--distributed-timeout", "20")
    try:
        _wait_healthy(port, ranks.procs)
        assert _complete(port) == expected
        embed = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"model": "m", "input": "hi"}, timeout=30)
        assert embed.status_code == 400 and "tensor parallel" in embed.json()["error"]["message"]
        ranks.procs[0].send_signal(signal.SIGTERM)
        for proc in ranks.procs:  # rank 0 shuts down and tells rank 1 to stop: both exit 0
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err[-3000:]
        assert ranks.procs[1].stdout is not None
    finally:
        ranks.close()


def test_an_idle_server_keeps_its_follower_and_a_dead_follower_stops_it(falcon) -> None:
    port = _free_port()
    ranks = _Ranks(falcon, port, "--distributed-timeout", "3")
    try:
        _wait_healthy(port, ranks.procs)
        time.sleep(8)  # idle for over twice the timeout: rank 0's keepalives hold the follower
        assert all(proc.poll() is None for proc in ranks.procs)
        _complete(port)
        os.killpg(ranks.procs[1].pid, signal.SIGKILL)
        _, err = ranks.procs[0].communicate(timeout=60)  # within the timeout, plus shutdown: no hang
        assert ranks.procs[0].returncode not in (0, None)
        assert "tensor-parallel group failed" in err
        assert "Traceback" not in err
    finally:
        ranks.close()


def test_a_dead_rank_0_makes_the_follower_exit_with_an_error(falcon) -> None:
    port = _free_port()
    ranks = _Ranks(falcon, port, "--distributed-timeout", "5")
    try:
        _wait_healthy(port, ranks.procs)
        os.killpg(ranks.procs[0].pid, signal.SIGKILL)
        out, err = ranks.procs[1].communicate(timeout=60)
        assert ranks.procs[1].returncode == 1
        assert out == ""  # a follower prints nothing to stdout
        lines = [line for line in err.splitlines() if "falconlm serve: error" in line]
        assert len(lines) == 1 and "tensor-parallel group failed" in lines[0], err[-3000:]
    finally:
        ranks.close()
