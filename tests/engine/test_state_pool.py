"""State slots for recurrent (Mamba) layers: the pool, the manager the scheduler sees, the hybrid manager."""

from __future__ import annotations

import pytest

from falconlm.engine.kv_cache_manager import KVCacheManager
from falconlm.engine.request import Request
from falconlm.engine.sampling_params import SamplingParams
from falconlm.engine.scheduler import Scheduler
from falconlm.engine.state_pool import HybridCacheManager, RecurrentStateManager, StatePool, state_slots


def _request(rid: str, n: int = 5, max_tokens: int = 4) -> Request:
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens), None, 0.0, 64)


def test_pool_hands_out_lowest_first_and_refuses_double_free():
    pool = StatePool(3)
    assert [pool.allocate(), pool.allocate()] == [0, 1]
    pool.free(0)
    assert pool.allocate() == 0
    assert pool.allocate() == 2
    assert pool.allocate() is None
    pool.free(1)
    with pytest.raises(ValueError, match="not held"):
        pool.free(1)


def test_state_slots_sized_from_memory():
    assert state_slots(1000, 16, None, None) == 16
    assert state_slots(1000, 16, 5500, None) == 5
    assert state_slots(1000, 16, None, 3000) == 3
    with pytest.raises(ValueError, match="recurrent state needs 1000 bytes"):
        state_slots(1000, 16, 999, None)


def test_admission_waits_for_a_slot_and_finishing_frees_it():
    manager = RecurrentStateManager(2)
    scheduler = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=64)
    for i in range(3):
        scheduler.add_request(_request(f"r{i}"))
    out = scheduler.schedule()
    assert [row.request.request_id for row in out.scheduled] == ["r0", "r1"]
    assert {row.request.state_slot for row in out.scheduled} == {0, 1}
    assert scheduler.num_waiting == 1 and manager.num_free_blocks == 0
    scheduler.abort_requests(["r0"])
    assert manager.num_free_blocks == 1
    out = scheduler.schedule()
    r2 = scheduler.get_request("r2")
    assert r2.state_slot == 0 and any(row.request is r2 and row.start == 0 for row in out.scheduled)


def test_stats_say_prefix_cache_is_off_and_why():
    stats = RecurrentStateManager(4).stats()
    assert stats.num_state_slots == 4 and stats.num_free_state_slots == 4
    assert stats.prefix_cache_enabled is False and "cannot be shared" in stats.prefix_cache_disabled_reason
    assert stats.num_blocks == 0
    assert RecurrentStateManager(4).get_computed_blocks(_request("x", n=40)) == ([], 0)


def test_hybrid_takes_both_or_neither():
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    manager = HybridCacheManager(kv, num_slots=2)
    a, b = _request("a", n=12), _request("b", n=12)
    assert manager.allocate_slots(a, 12) is not None
    assert a.state_slot == 0 and len(a.block_ids) == 3
    assert manager.allocate_slots(b, 12) is None  # 1 block left: no blocks, and no slot kept either
    assert b.state_slot is None and manager.states.pool.num_free == 1
    manager.free(a)
    assert a.state_slot is None and not a.block_ids and kv.num_free_blocks == 4
    stats = manager.stats()
    assert (stats.num_blocks, stats.num_state_slots, stats.prefix_cache_enabled) == (4, 2, False)
    with pytest.raises(ValueError, match="prefix caching off"):
        HybridCacheManager(KVCacheManager(4, 4, enable_prefix_caching=True), 2)
