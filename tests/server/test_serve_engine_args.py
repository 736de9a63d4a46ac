"""``falconlm serve`` hands its engine flags to the one engine factory."""

from __future__ import annotations

from falconlm.cli import build_parser
from falconlm.cli.serve import engine_args


def test_serve_flags_become_engine_args(tmp_path):
    argv = ["serve", "--model", str(tmp_path), "--dtype", "float32", "--max-num-seqs", "3"]
    argv += ["--max-num-batched-tokens", "64", "--block-size", "8", "--kv-cache-memory", "0.25"]
    argv += ["--no-prefix-caching", "--max-waiting", "7", "--threads", "2", "--max-model-len", "96"]
    args = engine_args(build_parser().parse_args(argv))
    assert args.model_path == tmp_path and args.dtype == "float32" and args.device is None
    assert (args.max_num_seqs, args.max_num_batched_tokens, args.block_size) == (3, 64, 8)
    assert args.kv_cache_memory == 0.25 and not args.enable_prefix_caching
    assert (args.max_waiting, args.threads, args.max_model_len) == (7, 2, 96)
    defaults = engine_args(build_parser().parse_args(["serve"]))
    assert defaults.enable_prefix_caching and defaults.max_num_batched_tokens == 512 and defaults.max_waiting == 1024
