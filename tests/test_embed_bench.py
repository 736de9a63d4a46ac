"""The embeddings benchmark's helpers that need no measurement: shape parsing and the table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_embeddings


def test_shapes_parse():
    assert bench_embeddings.parse_shape("16x128") == (16, 128)
    for bad in ("16", "0x5", "axb"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench_embeddings.parse_shape(bad)


def test_table_pairs_the_implementations():
    rows = [
        {"impl": "falconlm", "batch": 4, "length": 8, "embeddings_s": 40.0, "tokens_s": 320.0, "max_abs_diff": 1e-7},
        {
            "impl": "transformers",
            "batch": 4,
            "length": 8,
            "embeddings_s": 20.0,
            "tokens_s": 160.0,
            "max_abs_diff": 1e-7,
        },
    ]
    text = bench_embeddings.render(rows, "test")
    assert "| 4x8 | falconlm | 40.0 | 320 | 1.0e-07 |" in text
    assert "| 4x8 | ratio falconlm/transformers | 2.00x | 2.00x | |" in text


def test_mixed_table():
    rows = [
        {"case": "alone", "s_per_token": 0.02, "embedding_tokens_s": 0.0},
        {"case": "beside 8x4 embedding inputs", "s_per_token": 0.025, "embedding_tokens_s": 1280.0},
    ]
    text = bench_embeddings.render_mixed(rows)
    assert "| alone | 20.0 | 0 |" in text and "| beside 8x4 embedding inputs | 25.0 | 1280 |" in text
