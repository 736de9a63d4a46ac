"""Frozen snapshots of the engine's load: the scheduler and the KV-cache manager each build their own part.

Pure Python (no torch), so the scheduler and the KV-cache manager can build them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerStats:
    """The scheduler's queues and how often it preempted."""

    num_running: int = 0
    num_waiting: int = 0
    num_preemptions: int = 0


@dataclass(frozen=True)
class KVCacheStats:
    """The KV block pool's occupancy and the prefix cache's lookups since start."""

    num_blocks: int = 0
    num_free_blocks: int = 0
    num_prefix_query_tokens: int = 0
    num_prefix_hit_tokens: int = 0
    num_state_slots: int = 0  # recurrent-state slots (Mamba layers), one per running sequence
    num_free_state_slots: int = 0
    prefix_cache_enabled: bool = True
    prefix_cache_disabled_reason: str = ""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, from ``Engine.stats()``; the AsyncEngine publishes one after each step."""

    num_running: int = 0
    num_waiting: int = 0
    num_blocks: int = 0
    num_free_blocks: int = 0
    num_prefix_query_tokens: int = 0
    num_prefix_hit_tokens: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    num_state_slots: int = 0
    num_free_state_slots: int = 0
    prefix_cache_enabled: bool = True
    prefix_cache_disabled_reason: str = ""

    @classmethod
    def combine(cls, scheduler: SchedulerStats, kv_cache: KVCacheStats, num_steps: int) -> EngineStats:
        """One snapshot from the scheduler's and the KV-cache manager's parts."""
        return cls(
            num_running=scheduler.num_running,
            num_waiting=scheduler.num_waiting,
            num_blocks=kv_cache.num_blocks,
            num_free_blocks=kv_cache.num_free_blocks,
            num_prefix_query_tokens=kv_cache.num_prefix_query_tokens,
            num_prefix_hit_tokens=kv_cache.num_prefix_hit_tokens,
            num_preemptions=scheduler.num_preemptions,
            num_steps=num_steps,
            num_state_slots=kv_cache.num_state_slots,
            num_free_state_slots=kv_cache.num_free_state_slots,
            prefix_cache_enabled=kv_cache.prefix_cache_enabled,
            prefix_cache_disabled_reason=kv_cache.prefix_cache_disabled_reason,
        )

    @property
    def num_blocks_in_use(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_state_slots_in_use(self) -> int:
        return self.num_state_slots - self.num_free_state_slots

    @property
    def kv_cache_usage(self) -> float:
        return self.num_blocks_in_use / self.num_blocks if self.num_blocks else 0.0
