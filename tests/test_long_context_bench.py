"""benchmarks/bench_long_context.py: its options, its table, and both workers at a tiny size (the measurements
themselves are run by hand, see README, Long contexts)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_long_context as bench

TINY = ["--model-size", "tiny", "--prefill-lengths", "64", "160", "--decode-context", "200", "--new-tokens", "3"]
TINY += ["--doc-tokens", "128", "--chunk", "48", "--repeats", "1", "--rope", "linear:2"]


def test_rope_option():
    assert bench.parse_rope("none") is None
    assert bench.parse_rope("dynamic:4") == {"type": "dynamic", "factor": 4.0}
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_rope("yarn:4")


def test_lengths_beyond_the_scaled_context_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--rope", "linear:2"])  # 8192-token prompts past 2 x 2048 positions
    assert "exceed the checkpoint's context (4096)" in capsys.readouterr().err


def test_workers_measure_at_a_tiny_size(tmp_path):
    args = bench.parse_args([*TINY, "--out", str(tmp_path), "--dtype", "float32"])
    folder = bench.make_checkpoint(tmp_path, "tiny", args.rope)
    ours = bench.falconlm_worker(args, folder)
    ref = bench.transformers_worker(args, folder)
    for row in (ours, ref):
        assert row["prefill_64_tok_s"] > 0 and row["prefill_160_tok_s"] > 0 and row["decode_tok_s"] > 0
    # K/V of one group per layer (multi-query), float32: 2 x 1 x 16 x 2 layers x 4 bytes per position; the same
    # bytes in both (transformers caches multi-query K/V with one head too).
    assert ours["kv_bytes_context"] == ref["kv_bytes_context"] == 200 * 2 * 16 * 2 * 4
    assert ours["prefix_hit_tokens"] == 128  # the whole document came from the cache
    text = bench.render([ref, ours], args)
    assert "| ratio falconlm/transformers |" in text and "| second, same document |" in text
    assert "linear x2 RoPE scaling" in text
