"""BlockPool: free-queue order, ref counts, and hashes that survive a free until the block is reused."""

from __future__ import annotations

import pytest

from falconlm.engine.block_pool import BlockPool


def test_new_pool_is_all_free_in_id_order() -> None:
    pool = BlockPool(4)
    assert pool.num_free_blocks == 4
    assert pool.usage == 0.0
    assert pool.free_block_ids() == [0, 1, 2, 3]


def test_get_new_blocks_pops_from_the_front_with_ref_one() -> None:
    pool = BlockPool(4)
    assert pool.get_new_blocks(3) == [0, 1, 2]
    assert [pool.ref_count(b) for b in range(4)] == [1, 1, 1, 0]
    assert pool.num_free_blocks == 1
    assert pool.usage == 0.75


def test_get_new_blocks_raises_when_short_and_changes_nothing() -> None:
    pool = BlockPool(2)
    with pytest.raises(ValueError, match="only 2 free"):
        pool.get_new_blocks(3)
    assert pool.free_block_ids() == [0, 1]


def test_freed_blocks_join_the_back_in_the_order_given() -> None:
    pool = BlockPool(5)
    table = pool.get_new_blocks(3)  # [0, 1, 2]
    pool.free_blocks(reversed(table))  # a request's table is freed tail first
    assert pool.free_block_ids() == [3, 4, 2, 1, 0]
    assert pool.get_new_blocks(3) == [3, 4, 2]


def test_freed_cached_block_keeps_its_hash_until_reused() -> None:
    pool = BlockPool(2)
    [block] = pool.get_new_blocks(1)
    pool.cache_full_block(block, 1234)
    pool.free_blocks([block])
    assert pool.get_cached_block(1234) == block  # still a hit while it waits in the free queue
    assert pool.get_new_blocks(2) == [1, block]  # the other block goes first, then this one is evicted
    assert pool.get_cached_block(1234) is None
    assert pool.block_to_hash[block] is None
    assert 1234 not in pool.hash_to_block


def test_touch_revives_a_freed_cached_block() -> None:
    pool = BlockPool(3)
    [block] = pool.get_new_blocks(1)
    pool.cache_full_block(block, 99)
    pool.free_blocks([block])
    assert pool.num_free_blocks == 3
    hit = pool.get_cached_block(99)
    pool.touch([hit])
    assert pool.ref_count(block) == 1
    assert pool.num_free_blocks == 2
    assert block not in pool.free_block_ids()
    assert pool.get_new_blocks(2) == [1, 2]  # the revived block is not handed out again


def test_shared_block_is_free_only_when_every_holder_frees_it() -> None:
    pool = BlockPool(2)
    [block] = pool.get_new_blocks(1)
    pool.touch([block])
    assert pool.ref_count(block) == 2
    pool.free_blocks([block])
    assert pool.ref_count(block) == 1
    assert block not in pool.free_block_ids()
    pool.free_blocks([block])
    assert pool.free_block_ids() == [1, block]


def test_double_free_raises() -> None:
    pool = BlockPool(2)
    [block] = pool.get_new_blocks(1)
    pool.free_blocks([block])
    with pytest.raises(ValueError, match="already free"):
        pool.free_blocks([block])


def test_first_block_to_claim_a_hash_keeps_it() -> None:
    pool = BlockPool(2)
    first, second = pool.get_new_blocks(2)
    pool.cache_full_block(first, 7)
    pool.cache_full_block(second, 7)
    assert pool.get_cached_block(7) == first
    assert pool.block_to_hash[second] is None
    pool.free_blocks([second])
    pool.get_new_blocks(1)  # reusing ``second`` must not evict ``first``'s entry
    assert pool.get_cached_block(7) == first


def test_caching_disabled_never_hits() -> None:
    pool = BlockPool(2, enable_caching=False)
    [block] = pool.get_new_blocks(1)
    pool.cache_full_block(block, 5)
    assert pool.get_cached_block(5) is None
    assert pool.hash_to_block == {}


def test_pool_needs_a_block() -> None:
    with pytest.raises(ValueError):
        BlockPool(0)
