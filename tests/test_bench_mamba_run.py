"""bench_mamba.py runs end to end on its toy shape (both dtypes, transformers beside, the context table)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_run_prints_every_table(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_mamba.py"), "--tiny", "--threads", "1", "--out"]
    done = subprocess.run([*cmd, str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for line in ("| float32 | ratio falconlm/transformers |", "| bfloat16 | ratio falconlm/transformers |"):
        assert line in done.stdout
    assert "| falcon-mamba |" in done.stdout and "| falcon (bench-194m) |" in done.stdout
    result = json.loads((tmp_path / "bench-mamba-tiny.json").read_text())
    assert {(r["impl"], r["dtype"]) for r in result["throughput"]} == {
        (impl, dtype) for impl in ("falconlm", "transformers") for dtype in ("float32", "bfloat16")
    }
    for values in result["decode_ms_per_token"].values():
        assert len(values) == len(result["contexts"]) and all(v > 0 for v in values)
    assert result["state_bytes_per_sequence"] > 0
