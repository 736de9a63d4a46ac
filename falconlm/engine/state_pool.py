"""Recurrent-state slots: a Mamba layer keeps a fixed-size state per sequence (conv + SSM), not a growing KV cache.

Pure Python (no torch), like the KV cache manager beside it. The state tensors themselves live in the runner
(``model.falcon_mamba.MambaStates``, one slot per row); here a slot is an int that a request holds from admission
to its end:

* :class:`StatePool` hands slots out and takes them back;
* :class:`RecurrentStateManager` stands where the scheduler expects a :class:`KVCacheManager` for attention-free
  models: a request needs one slot whatever its length, admission waits for a free one, preemption and finishing
  free it (recomputation rebuilds the state from the first token);
* :class:`HybridCacheManager` holds both, KV blocks and a state slot, for models with attention and Mamba layers.

Prefix caching is off for these: a recurrent state summarises the whole prefix and cannot be shared block by
block (``PREFIX_CACHE_OFF_REASON``, reported in the stats and metrics).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from falconlm.engine.stats import KVCacheStats

if TYPE_CHECKING:
    from falconlm.engine.kv_cache_manager import KVCacheManager
    from falconlm.engine.request import Request

PREFIX_CACHE_OFF_REASON = "recurrent (Mamba) state summarises the whole prefix and cannot be shared by blocks"


class StatePool:
    """Slots ``0..num_slots-1``; the lowest free one goes out first (so small batches stay in low rows)."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # a stack, lowest on top

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int | None:
        return self._free.pop() if self._free else None

    def free(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or slot in self._free:
            raise ValueError(f"state slot {slot} is not held")
        self._free.append(slot)
        self._free.sort(reverse=True)


def state_slots(bytes_per_sequence: int, max_num_seqs: int, memory_bytes: int | None, free_bytes: int | None) -> int:
    """Slots for the pool: ``max_num_seqs``, capped by ``memory_bytes`` (else ``free_bytes``) worth of states.

    ValueError (one line) when not even one sequence's state fits."""
    slots = max_num_seqs
    budget = memory_bytes if memory_bytes is not None else free_bytes
    if budget is not None:
        slots = min(slots, budget // max(bytes_per_sequence, 1))
    if slots < 1:
        raise ValueError(
            f"one sequence's recurrent state needs {bytes_per_sequence} bytes, more than the {budget} bytes "
            "available; raise --kv-cache-memory"
        )
    return slots


class RecurrentStateManager:
    """The KV-cache manager's interface over a :class:`StatePool`: one slot per running request."""

    enable_prefix_caching = False
    prefix_cache_disabled_reason = PREFIX_CACHE_OFF_REASON

    def __init__(self, num_slots: int) -> None:
        self.pool = StatePool(num_slots)
        self.num_prefix_queries_tokens = 0

    @property
    def num_blocks(self) -> int:
        """Slots stand for blocks in the scheduler's checks (a request needs one)."""
        return self.pool.num_slots

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def num_blocks_for(self, num_tokens: int) -> int:
        return 1

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        return [], 0

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: Sequence[int] = ()
    ) -> list[int] | None:
        """A slot for a request that has none (admission); nothing to grow for one that has. None when the pool
        is empty."""
        if request.state_slot is not None:
            return []
        slot = self.pool.allocate()
        if slot is None:
            return None
        request.state_slot = slot
        self.num_prefix_queries_tokens += request.num_tokens
        return []

    def cache_full_blocks(self, request: Request) -> None:
        """Nothing to register: no prefix cache."""

    def free(self, request: Request) -> None:
        if request.state_slot is not None:
            self.pool.free(request.state_slot)
            request.state_slot = None

    def stats(self) -> KVCacheStats:
        return KVCacheStats(
            num_prefix_query_tokens=self.num_prefix_queries_tokens,
            num_state_slots=self.pool.num_slots,
            num_free_state_slots=self.pool.num_free,
            prefix_cache_enabled=False,
            prefix_cache_disabled_reason=PREFIX_CACHE_OFF_REASON,
        )


class HybridCacheManager:
    """KV blocks for the attention layers and a state slot for the Mamba layers, taken and given back together.

    ``kv`` should be built without prefix caching (the state half cannot be shared); admission needs both a slot
    and the blocks, and a request preempted for blocks gives its slot back too."""

    enable_prefix_caching = False
    prefix_cache_disabled_reason = PREFIX_CACHE_OFF_REASON

    def __init__(self, kv: KVCacheManager, num_slots: int) -> None:
        if kv.enable_prefix_caching:
            raise ValueError("a hybrid model's KV manager must have prefix caching off")
        self.kv = kv
        self.states = RecurrentStateManager(num_slots)
        self.block_size = kv.block_size

    @property
    def num_blocks(self) -> int:
        return self.kv.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.kv.num_free_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return self.kv.num_blocks_for(num_tokens)

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        return [], 0

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: Sequence[int] = ()
    ) -> list[int] | None:
        had_slot = request.state_slot is not None
        if self.states.allocate_slots(request, num_new_tokens) is None:
            return None
        blocks = self.kv.allocate_slots(request, num_new_tokens)
        if blocks is None and not had_slot:  # all or nothing
            self.states.free(request)
        return blocks

    def cache_full_blocks(self, request: Request) -> None:
        """Nothing to register: no prefix cache."""

    def free(self, request: Request) -> None:
        self.kv.free(request)
        self.states.free(request)

    def stats(self) -> KVCacheStats:
        kv, st = self.kv.stats(), self.states.stats()
        return KVCacheStats(
            kv.num_blocks,
            kv.num_free_blocks,
            st.num_prefix_query_tokens,
            0,
            st.num_state_slots,
            st.num_free_state_slots,
            False,
            PREFIX_CACHE_OFF_REASON,
        )
