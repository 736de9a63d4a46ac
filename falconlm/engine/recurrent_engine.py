"""The Engine's parts for a recurrent (Mamba) model: a state-slot manager in place of the KV cache manager, and the
RecurrentRunner, sized from the memory settings like the KV pool is."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .memory import FREE_SHARE, free_memory
from .recurrent_runner import RecurrentRunner
from .state_pool import PREFIX_CACHE_OFF_REASON, RecurrentStateManager, state_slots

if TYPE_CHECKING:
    from ..model.falcon_mamba import FalconMambaForCausalLM
    from .engine import EngineConfig

logger = logging.getLogger(__name__)


def state_bytes_per_sequence(model: FalconMambaForCausalLM) -> int:
    """Bytes of recurrent state one sequence holds in this engine: conv state in the model dtype, SSM in float32."""
    return model.config.state_bytes_per_sequence(conv_bytes=model.dtype.itemsize, ssm_bytes=4)


def recurrent_parts(
    model: FalconMambaForCausalLM, config: EngineConfig, max_model_len: int
) -> tuple[RecurrentStateManager, RecurrentRunner, int]:
    """(manager, runner, token capacity per request). ``num_blocks`` in the config, when given, is the slot
    count; else ``max_num_seqs`` slots, capped by ``kv_cache_memory`` bytes or a share of the free memory."""
    per_sequence = state_bytes_per_sequence(model)
    if config.num_blocks is not None:
        slots = config.num_blocks
    else:
        free = free_memory(model.device)
        share = None if free is None else int(free * FREE_SHARE.get(model.device.type, 0.5))
        slots = state_slots(per_sequence, config.max_num_seqs, config.kv_cache_memory, share)
    if config.enable_prefix_caching:
        logger.info("prefix caching is off for this model: %s", PREFIX_CACHE_OFF_REASON)
    logger.info("recurrent state: %d slots of %d bytes per sequence", slots, per_sequence)
    # A state does not grow with the context: any request up to max_model_len fits once it holds a slot.
    return RecurrentStateManager(slots), RecurrentRunner(model, slots, config.deterministic), max_model_len
