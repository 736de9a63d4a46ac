"""bench_h1's shape and table (the measurements themselves are run by hand, see README, Performance)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytest.importorskip("transformers")

import bench_h1

from falconlm.model.h1_config import FalconH1Config


def test_bench_shape_is_about_200m_with_the_0_5b_layer() -> None:
    config = FalconH1Config.from_dict(bench_h1.hf_config("200m").to_dict())
    assert 1.9e8 < config.num_parameters() < 2.2e8
    assert (config.mamba_n_heads, config.mamba_d_state, config.num_key_value_heads) == (24, 128, 2)
    assert config.key_multiplier != 1.0 and config.ssm_multipliers[1] == 0.25


def test_table_has_ratios() -> None:
    rates = {"prefill_tok_s": 100.0, "decode_b1_tok_s": 10.0}
    report = {
        "shape": "bench-h1-200m",
        "parameters": 206e6,
        "dtype": "bfloat16",
        "threads": 2,
        "falconlm_path": "engine",
        "kv_cache_bytes_per_token": 22528,
        "recurrent_state_bytes_per_sequence": 9 * 2**20,
        "results": {"falconlm": rates, "transformers": {k: v / 4 for k, v in rates.items()}},
    }
    text = bench_h1.render(report)
    assert "206M parameters" in text and "9.00 MiB/sequence" in text
    assert "| ratio | 4.00x | 4.00x |" in text
