"""Crash test: SIGKILL ``falconlm batch run`` at random moments, some inside a result transaction, run it again,
and compare the final files with an uninterrupted run.

The crashing runs go through ``commit_hook_launcher.py``, which gives the store an ``on_commit`` hook that
appends ``commit <results> <rows marked>`` to a file from inside each result transaction and then sleeps
before COMMIT, so a kill sent as soon as a new line appears lands inside the transaction. The file also proves
that no committed request is ever computed again: in every transaction, every result marks a row that was
still pending.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

N_VALID = 200
KILL_PLAN = ("commit", "early", "commit", "running", "commit", "running", "commit")
WORDS = ["Once upon a time", "The fox", "A big bear", "Numbers like 123", "The river", "café naïve", "They played"]


def build_input(path: Path) -> tuple[list[str], list[tuple[str | None, str]]]:
    """200 greedy requests (some chat) with bad lines in between; returns valid ids and expected errors."""
    lines, valid, invalid = [], [], []
    for i in range(N_VALID):
        custom_id = f"req-{i:03d}"
        body = {"max_tokens": 4 + i % 5, "temperature": 0}
        if i % 10 == 3:
            url, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": f"{WORDS[i % 7]} {i}"}]
        else:
            url, body["prompt"] = "/v1/completions", f"{WORDS[i % 7]} {i}"
        lines.append(json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}))
        valid.append(custom_id)
        if i % 40 == 17:
            bad = [
                ("{broken", (None, "invalid_json")),
                (json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}), (None, "missing_custom_id")),
                (lines[-1], (custom_id, "duplicate_custom_id")),
                (lines[-1].replace('"temperature"', '"bogus"'), (custom_id, "unsupported_field")),
                (json.dumps({"custom_id": f"x{i}", "method": "POST", "url": "/v1/edits"}), (f"x{i}", "invalid_url")),
            ][(i // 40) % 5]
            lines.append(bad[0])
            invalid.append(bad[1])
    path.write_text("\n".join(lines) + "\n")
    return valid, invalid


def command(tmp: Path, checkpoint: Path, source: Path, tag: str) -> list[str]:
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
        "8",
    ]


def hook_lines(hook: Path) -> list[tuple[int, int]]:
    if not hook.exists():
        return []
    return [(int(a), int(b)) for _, a, b in (line.split() for line in hook.read_text().splitlines())]


def finished_in_store(state: Path) -> int:
    db = state / "batch.db"
    if not db.exists():
        return 0
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT count(*) FROM requests WHERE status != 'pending'").fetchone()[0]
    except sqlite3.OperationalError:  # killed before the schema existed
        return 0
    finally:
        conn.close()


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 90.0) -> bool:
    """Poll until ``predicate()``; False if the process exits first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            raise AssertionError("the batch process made no progress")
        time.sleep(0.003)
    return True


def answer(line: dict) -> tuple:
    body = line["response"]["body"]
    texts = [c.get("text", c.get("message", {}).get("content")) for c in body["choices"]]
    return texts, [c["finish_reason"] for c in body["choices"]], body["usage"]


def test_sigkill_at_random_moments_then_resume(tmp_path, tiny_checkpoint, capsys):
    seed = int(os.environ.get("FALCONLM_CRASH_SEED") or time.time_ns() % 100_000)
    rng = random.Random(seed)
    source = tmp_path / "in.jsonl"
    valid, invalid = build_input(source)

    # One intra-op thread: every run computes alike, and runs stay quick on a busy machine.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    reference_argv = [sys.executable, "-m", "falconlm", *command(tmp_path, tiny_checkpoint, source, "ref")]
    subprocess.run(reference_argv, env=env, check=True, capture_output=True, timeout=300)
    reference = {o["custom_id"]: answer(o) for o in map(json.loads, (tmp_path / "ref-out.jsonl").open())}
    assert sorted(reference) == sorted(valid)

    hook, state = tmp_path / "hook.txt", tmp_path / "crash-state"
    launcher = ["-m", "tests.batch.commit_hook_launcher", str(hook), "0.1"]  # 0.1 s inside each transaction
    argv = [sys.executable, *launcher, *command(tmp_path, tiny_checkpoint, source, "crash")]
    kills: Counter[str] = Counter()
    expected_finished = 0  # rows committed so far, from the hook lines of committed transactions
    for plan in KILL_PLAN:
        seen = len(hook_lines(hook))
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if plan == "commit":
            target = seen + rng.randint(1, 4)
            alive = wait_for(lambda target=target: len(hook_lines(hook)) >= target, proc)
        elif plan == "running":
            alive = wait_for(lambda seen=seen: len(hook_lines(hook)) > seen, proc)
            time.sleep(rng.uniform(0.0, 0.6))
        else:
            time.sleep(rng.uniform(0.2, 3.0))
            alive = proc.poll() is None
        if not alive or proc.poll() is not None:
            proc.wait()
            break  # it finished before the kill: nothing left to interrupt
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills[plan] += 1
        new = hook_lines(hook)[seen:]
        in_store = finished_in_store(state)
        if plan == "commit":  # the last transaction was open when the kill landed: none of it may be kept
            expected_finished += sum(marked for _, marked in new[:-1])
            assert in_store == expected_finished, f"seed {seed}: a killed transaction left rows behind"
        else:  # the kill may or may not have hit a transaction
            marked = [m for _, m in new]
            assert in_store in (expected_finished + sum(marked), expected_finished + sum(marked[:-1])), f"seed {seed}"
            expected_finished = in_store

    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"seed {seed}: {done.stderr}"

    outputs = [json.loads(line) for line in (tmp_path / "crash-out.jsonl").open()]
    errors = [json.loads(line) for line in (tmp_path / "crash-err.jsonl").open()]
    assert Counter(o["custom_id"] for o in outputs) == Counter(valid), f"seed {seed}"
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == invalid, f"seed {seed}"
    for o in outputs:
        assert answer(o) == reference[o["custom_id"]], f"seed {seed}: {o['custom_id']} differs from the reference"
    transactions = hook_lines(hook)
    assert all(results == marked for results, marked in transactions), f"seed {seed}: a committed request reran"
    assert kills["commit"] >= 3 and sum(kills.values()) >= 5, f"seed {seed}: too few kills landed: {dict(kills)}"
    with capsys.disabled():
        print(f"\n[crash test] seed {seed}: SIGKILLs {dict(kills)}, {len(transactions)} result transactions")
