"""Bounded memory: the peak RSS of ``falconlm batch run`` does not grow with the input (2k vs 20k lines)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PAD = "x" * 2000  # an ignored body field, so that 20k lines are ~45 MB: loading them at once would show
DRIVER = (
    "import resource, sys\n"
    "from falconlm.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\n"
    "sys.exit(code)\n"
)


def peak_rss_kib(tmp: Path, checkpoint: Path, lines: int) -> int:
    source = tmp / f"in-{lines}.jsonl"
    with open(source, "w") as f:
        for i in range(lines):
            body = {"prompt": f"The fox {i % 50}", "max_tokens": 1, "temperature": 0, "user": PAD}
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body}))
            f.write("\n")
    out = tmp / f"out-{lines}.jsonl"
    argv = ["batch", "run", str(source), "-o", str(out), "--model", str(checkpoint), "--dtype", "float32"]
    argv += ["--max-num-seqs", "64"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}  # quick on a busy machine
    done = subprocess.run([sys.executable, "-c", DRIVER, *argv], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    with open(out) as f:
        assert sum(1 for _ in f) == lines
    return int(done.stdout.split()[-1])


def test_peak_rss_does_not_grow_with_input_size(tmp_path, tiny_checkpoint, capsys):
    small = peak_rss_kib(tmp_path, tiny_checkpoint, 2_000)
    large = peak_rss_kib(tmp_path, tiny_checkpoint, 20_000)
    with capsys.disabled():
        print(f"\n[memory] peak RSS: 2k lines {small / 1024:.0f} MiB, 20k lines {large / 1024:.0f} MiB")
    assert large - small < 24 * 1024, f"peak RSS grew from {small} KiB to {large} KiB"
