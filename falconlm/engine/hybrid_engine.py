"""The Engine's parts for a hybrid model (attention and Mamba layers, Falcon-H1): KV blocks *and* a recurrent
state slot per running request, both from one memory budget.

The states are sized first (a fixed size per sequence, ``max_num_seqs`` of them at most, leaving room for one
full context of KV), the KV pool takes what is left. Prefix caching is off: the recurrent half of a cached
prefix could not be restored from KV blocks.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..model.paged_attention import PagedKVCache
from .hybrid_runner import HybridRunner
from .kv_cache_manager import KVCacheManager
from .memory import FREE_SHARE, free_memory, kv_cache_blocks
from .state_pool import PREFIX_CACHE_OFF_REASON, HybridCacheManager, state_slots

if TYPE_CHECKING:
    from .engine import EngineConfig

logger = logging.getLogger(__name__)


def hybrid_state_bytes_per_sequence(model) -> int:
    """One sequence's recurrent state in this engine: conv state in the model dtype, the SSM state in float32."""
    return model.config.ssm_state_bytes_per_sequence(conv_bytes=model.final_norm.weight.element_size(), ssm_bytes=4)


def hybrid_parts(model, config: EngineConfig, max_model_len: int) -> tuple[HybridCacheManager, HybridRunner, int]:
    """(manager, runner, KV token capacity). ``num_blocks`` in the config, when given, is the KV block count and
    every one of ``max_num_seqs`` gets a state slot; else both come out of ``kv_cache_memory`` bytes (or a share
    of the free memory): as many states as fit beside one full context of KV (``max_num_seqs`` at most), then
    KV blocks from the rest."""
    cfg, weight = model.config, model.final_norm.weight
    per_sequence = hybrid_state_bytes_per_sequence(model)
    per_block = PagedKVCache.bytes_per_block(
        cfg.num_hidden_layers, config.block_size, cfg.num_kv_groups, cfg.head_dim, weight.element_size()
    )
    if config.num_blocks is not None:
        slots, blocks = config.max_num_seqs, config.num_blocks
    else:
        budget = config.kv_cache_memory
        if budget is None:
            free = free_memory(weight.device)
            budget = None if free is None else int(free * FREE_SHARE.get(weight.device.type, 0.5))
        one_context = -(-max_model_len // config.block_size) * per_block  # the KV pool must hold one full context
        slots = state_slots(per_sequence, config.max_num_seqs, None if budget is None else budget - one_context, None)
        left = None if budget is None else budget - slots * per_sequence
        blocks = kv_cache_blocks(per_block, config.block_size, config.max_num_seqs, max_model_len, left, weight.device)
    if config.enable_prefix_caching:
        logger.info("prefix caching is off for this model: %s", PREFIX_CACHE_OFF_REASON)
    logger.info("hybrid cache: %d KV blocks and %d state slots of %d bytes", blocks, slots, per_sequence)
    manager = HybridCacheManager(KVCacheManager(blocks, config.block_size, False), slots)
    runner = HybridRunner(model, blocks, config.block_size, slots, config.deterministic)
    return manager, runner, blocks * config.block_size
