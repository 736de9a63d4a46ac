"""One rank of the tensor-parallel engine tests, run by ``torchrun`` (or alone for the 1-process answer).

``python tp_engine_worker.py [--deterministic] OUT.json CKPT [CKPT...]``: for each checkpoint rank 0 builds the
engine with the test's settings (a small KV pool, chunked prefill) and writes the greedy tokens of ``PROMPTS``,
the number of preemptions and one request's logprobs and prompt logprobs to ``OUT.json``; the other ranks follow
rank 0 for each checkpoint in turn. ``--deterministic``: the engine's deterministic mode, where a step's decode
rows and prompt chunks are separate forwards.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from falconlm.cli.parallel import leave_group
from falconlm.engine.factory import EngineArgs, build_engine
from falconlm.engine.sampling_params import SamplingParams
from falconlm.engine.tp_follower import run_follower
from falconlm.model.families import load_config
from falconlm.model.paged_attention import PagedKVCache
from falconlm.parallel.heads import split_heads
from falconlm.parallel.state import exit_rank

PROMPTS = [list(range(1, 14)), [5, 6], list(range(20, 41)), [3], [9, 9, 9, 9, 9, 9]]
STEPS = 8
BLOCK_SIZE = 4
MAX_MODEL_LEN = 32


def engine_args(path: str | Path, tensor_parallel_size: int, deterministic: bool = False) -> EngineArgs:
    """Four sequences at once, 16-token steps (prompts of 21 tokens are chunked) and, for attention-only
    models, a KV pool of 10 blocks of 4 tokens on every rank: too few for every request at once, so some are
    preempted."""
    cfg = load_config(path)
    kv_memory = None
    if not getattr(cfg, "recurrent", False) and not getattr(cfg, "hybrid", False):
        # kv_cache_memory is per rank, and rank 0 sizes the pool from its own share of the KV groups.
        groups = split_heads(cfg.num_attention_heads, cfg.num_kv_groups, cfg.head_dim, tensor_parallel_size, 0)
        layers, dim = cfg.num_hidden_layers, cfg.head_dim
        per_block = PagedKVCache.bytes_per_block(layers, BLOCK_SIZE, groups.local_groups, dim, 4)
        kv_memory = 10 * per_block
    return EngineArgs(
        model=path,
        dtype="float32",
        device="cpu",
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=4,
        max_num_batched_tokens=16,
        block_size=BLOCK_SIZE,
        kv_cache_memory=kv_memory,
        threads=1,
        skip_tokenizer_init=True,
        tensor_parallel_size=tensor_parallel_size,
        distributed_timeout_s=60.0,
        deterministic=deterministic,
    )


def greedy(path: str | Path, tensor_parallel_size: int, deterministic: bool = False) -> dict:
    """Rank 0's answer for one checkpoint: the greedy tokens of every prompt and how many preemptions it took."""
    engine = build_engine(engine_args(path, tensor_parallel_size, deterministic))
    try:
        params = [SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True) for _ in PROMPTS]
        # The chunked 21-token prompt also scores its prompt (extra logits rows that every rank must agree on).
        params[2] = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True, logprobs=2, prompt_logprobs=2)
        outputs = engine.generate(PROMPTS, params)
        scored = outputs[2]
        return {
            "tokens": [o.token_ids for o in outputs],
            "preemptions": engine.stats().num_preemptions,
            "logprobs": [[lp.logprob, *(t for t, _ in lp.top)] for lp in scored.logprobs],
            "prompt_logprobs": [[lp.logprob, *(t for t, _ in lp.top)] for lp in scored.prompt_logprobs[1:]],
        }
    finally:
        engine.close()


def main(out: str, checkpoints: list[str], deterministic: bool = False) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        if int(os.environ.get("RANK", "0")) > 0:
            for path in checkpoints:
                run_follower(engine_args(path, world, deterministic))
            return 0
        results = {path: greedy(path, world, deterministic) for path in checkpoints}
        Path(out).write_text(json.dumps(results))
        return 0
    finally:
        leave_group()


if __name__ == "__main__":
    args = sys.argv[1:]
    deterministic = args[:1] == ["--deterministic"]
    args = args[1:] if deterministic else args
    exit_rank(main(args[0], args[1:], deterministic))  # no interpreter finalization (see exit_rank)
