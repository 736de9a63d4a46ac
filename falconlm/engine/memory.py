"""KV-pool sizing from the memory that is really free, and the context-length limits behind it.

The default pool holds ``max_num_seqs`` full contexts, capped by a share of the memory free once the weights
are loaded (``/proc/meminfo`` MemAvailable on CPU, ``torch.cuda.mem_get_info`` on CUDA). A pool that cannot
hold one full context is refused, as vLLM does, instead of growing until the machine swaps or is killed.
"""

from __future__ import annotations

import os

import torch

from ..model.config import FalconConfig

FREE_SHARE = {"cpu": 0.5, "cuda": 0.8}  # of the free memory, for the default pool (activations need the rest)
ROPE_STRETCH = ("linear", "dynamic")


def context_limit(config: FalconConfig) -> int:
    """The longest context the model supports: ``max_position_embeddings``, stretched by RoPE scaling."""
    scaling = config.rope_scaling
    if scaling is None or scaling.rope_type not in ROPE_STRETCH:
        return config.max_position_embeddings
    original = scaling.original_max_position_embeddings or config.max_position_embeddings
    return max(config.max_position_embeddings, int(original * scaling.factor))


def check_max_model_len(config: FalconConfig, max_model_len: int | None) -> int:
    """The context length to serve: the model's own by default; a longer one only as far as RoPE scaling allows."""
    if max_model_len is None:
        return config.max_position_embeddings
    if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or max_model_len < 2:
        raise ValueError(f"max_model_len must be a whole number >= 2, got {max_model_len!r}")
    limit = context_limit(config)
    if max_model_len > limit:
        how = "its rope_scaling" if config.rope_scaling is not None else "no rope_scaling in its config"
        raise ValueError(
            f"max_model_len {max_model_len} is longer than the model supports ({limit} tokens, with {how})"
        )
    return max_model_len


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device`` now, or None when this platform cannot tell."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def kv_cache_blocks(
    bytes_per_block: int,
    block_size: int,
    max_num_seqs: int,
    max_model_len: int,
    kv_cache_memory: int | None,
    device: torch.device,
) -> int:
    """Blocks for the pool: ``max_num_seqs`` full contexts, capped by ``kv_cache_memory`` bytes when given, else
    by a share of the free memory. ValueError (one line) when one full context does not fit."""
    if max_num_seqs < 1 or block_size < 1:
        raise ValueError(f"max_num_seqs and block_size must be >= 1, got {max_num_seqs} and {block_size}")
    per_context = -(-max_model_len // block_size)
    blocks = max_num_seqs * per_context
    if kv_cache_memory is not None:
        budget, where = kv_cache_memory, "--kv-cache-memory"
    else:
        free = free_memory(device)
        share = FREE_SHARE.get(device.type, 0.5)
        budget = None if free is None else int(free * share)
        where = f"{share:.0%} of the {_gib(free or 0)} free on {device.type}"
    if budget is not None:
        blocks = min(blocks, budget // bytes_per_block)
    if blocks < per_context:
        raise ValueError(
            f"max seq len ({max_model_len}) is larger than the KV cache can hold "
            f"({blocks * block_size} tokens in {where}); lower --max-model-len or raise --kv-cache-memory"
        )
    return blocks


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"
