"""``falconlm serve`` hands its engine flags to the one engine factory."""

from __future__ import annotations

import pytest
import torch

from falconlm.cli import build_parser
from falconlm.cli.serve import engine_args
from falconlm.engine.devices import auto_step_tokens
from falconlm.native import ops


def test_serve_flags_become_engine_args(tmp_path):
    argv = ["serve", "--model", str(tmp_path), "--dtype", "float32", "--max-num-seqs", "3"]
    argv += ["--max-num-batched-tokens", "64", "--block-size", "8", "--kv-cache-memory", "0.25"]
    argv += ["--no-prefix-caching", "--max-waiting", "7", "--threads", "2", "--max-model-len", "96"]
    argv += ["--num-scheduler-steps", "1"]
    args = engine_args(build_parser().parse_args(argv))
    assert args.model_path == tmp_path and args.dtype == "float32" and args.device is None
    assert (args.max_num_seqs, args.max_num_batched_tokens, args.block_size) == (3, 64, 8)
    assert args.kv_cache_memory == 0.25 and not args.enable_prefix_caching
    assert (args.max_waiting, args.threads, args.max_model_len, args.num_scheduler_steps) == (7, 2, 96, 1)
    defaults = engine_args(build_parser().parse_args(["serve"]))
    assert defaults.enable_prefix_caching and defaults.max_waiting == 1024 and defaults.num_scheduler_steps == 16


@pytest.mark.parametrize(("bf16_arithmetic", "step_tokens"), [(True, 512), (False, 128)])
def test_the_default_step_is_shorter_where_prompts_are_slow(bf16_arithmetic, step_tokens, monkeypatch, caplog):
    """On a CPU without bfloat16 arithmetic (AVX2-only x86) a generation server's steps default to 128 tokens, and
    it says so; a GPU, a CPU with bfloat16 arithmetic or an embedding server keeps 512; a number given is kept."""
    monkeypatch.setattr(ops, "bf16_hardware", lambda: bf16_arithmetic)
    with caplog.at_level("INFO", logger="falconlm.serve"):
        args = engine_args(build_parser().parse_args(["serve", "--device", "cpu"]))
    assert args.max_num_batched_tokens == step_tokens
    assert f"max-num-batched-tokens auto: {step_tokens}" in caplog.text
    given = engine_args(build_parser().parse_args(["serve", "--device", "cpu", "--max-num-batched-tokens", "300"]))
    assert given.max_num_batched_tokens == 300
    embed = engine_args(build_parser().parse_args(["serve", "--device", "cpu", "--task", "embed"]))
    assert embed.max_num_batched_tokens == 512  # no first tokens to wait for
    assert auto_step_tokens(torch.device("cuda")) == (512, "a cuda device")
