"""KVCacheManager: chained block hashes, prefix hits, all-or-nothing allocation, and freeing."""

from __future__ import annotations

from falconlm.engine.kv_cache_manager import KVCacheManager, block_hash
from falconlm.engine.request import Request
from falconlm.engine.sampling_params import SamplingParams

BLOCK = 4


def make_request(request_id: str, prompt: list[int], max_tokens: int = 8) -> Request:
    return Request(request_id, prompt, SamplingParams(max_tokens=max_tokens), None, 0.0, 1024)


def compute(manager: KVCacheManager, request: Request, num_tokens: int, hit: tuple[list[int], int] = ([], 0)) -> None:
    """What the scheduler and runner do for one step: allocate, compute, register full blocks."""
    blocks, num_hit = hit
    assert manager.allocate_slots(request, num_tokens, blocks) is not None
    request.num_computed_tokens += num_hit + num_tokens
    manager.cache_full_blocks(request)


def admit(manager: KVCacheManager, request: Request) -> tuple[list[int], int]:
    """Look up the prefix cache and compute the rest of the prompt; return the hit."""
    hit = manager.get_computed_blocks(request)
    compute(manager, request, request.num_tokens - hit[1], hit)
    return hit


def test_block_hash_is_chained_and_deterministic() -> None:
    ids = [1, 2, 3, 4]
    assert block_hash(None, ids) == block_hash(None, list(ids))
    assert block_hash(None, ids) != block_hash(None, [1, 2, 3, 5])
    assert block_hash(block_hash(None, [9, 9, 9, 9]), ids) != block_hash(block_hash(None, [8, 9, 9, 9]), ids)
    assert block_hash(None, ids) != block_hash(block_hash(None, []), ids)


def test_fresh_cache_has_no_hit() -> None:
    manager = KVCacheManager(8, BLOCK)
    assert manager.get_computed_blocks(make_request("a", list(range(10)))) == ([], 0)


def test_computed_full_blocks_are_hit_by_a_later_request() -> None:
    manager = KVCacheManager(8, BLOCK)
    a = make_request("a", list(range(10)))  # blocks: [0..3] [4..7] [8, 9]
    admit(manager, a)
    table = list(a.block_ids)
    b = make_request("b", [*range(8), 50, 51, 52])
    blocks, num_hit = manager.get_computed_blocks(b)
    assert blocks == table[:2]
    assert num_hit == 8


def test_blocks_are_cached_only_once_computed() -> None:
    manager = KVCacheManager(8, BLOCK)
    a = make_request("a", list(range(12)))
    assert manager.allocate_slots(a, 8) is not None  # a chunk of 8: two full blocks, not computed yet
    assert manager.get_computed_blocks(make_request("b", list(range(12)))) == ([], 0)
    a.num_computed_tokens = 8
    manager.cache_full_blocks(a)
    assert manager.get_computed_blocks(make_request("c", list(range(12))))[1] == 8


def test_same_block_after_a_different_prefix_does_not_hit() -> None:
    manager = KVCacheManager(8, BLOCK)
    admit(manager, make_request("a", [1, 1, 1, 1, 5, 6, 7, 8, 0]))
    other = make_request("b", [2, 2, 2, 2, 5, 6, 7, 8, 0])  # second block has the same tokens
    assert manager.get_computed_blocks(other) == ([], 0)


def test_last_prompt_token_is_always_computed() -> None:
    manager = KVCacheManager(8, BLOCK)
    admit(manager, make_request("a", list(range(8))))  # exactly two full blocks, both cached
    blocks, num_hit = manager.get_computed_blocks(make_request("b", list(range(8))))
    assert num_hit == 4  # (8 - 1) // 4 blocks: the second block is recomputed
    assert len(blocks) == 1
    _, num_hit = manager.get_computed_blocks(make_request("c", list(range(9))))
    assert num_hit == 8


def test_shared_prefix_is_ref_counted() -> None:
    manager = KVCacheManager(8, BLOCK)
    pool = manager.block_pool
    a = make_request("a", list(range(10)))
    admit(manager, a)
    b = make_request("b", list(range(10)))
    assert admit(manager, b)[1] == 8
    assert b.block_ids[:2] == a.block_ids[:2]
    assert b.block_ids[2] != a.block_ids[2]
    assert [pool.ref_count(x) for x in a.block_ids] == [2, 2, 1]
    assert manager.num_free_blocks == 4
    shared = a.block_ids[:2]
    manager.free(a)
    assert a.block_ids == []
    assert [pool.ref_count(x) for x in shared] == [1, 1]
    assert manager.num_free_blocks == 5
    tail = b.block_ids[2]
    manager.free(b)
    assert manager.num_free_blocks == 8
    assert pool.free_block_ids()[-3:] == [tail, shared[1], shared[0]]  # tail first: evicted before the prefix


def test_hit_on_freed_blocks_revives_them() -> None:
    manager = KVCacheManager(4, BLOCK)
    a = make_request("a", list(range(9)))
    admit(manager, a)
    prefix = a.block_ids[:2]
    manager.free(a)
    b = make_request("b", list(range(9)))
    blocks, num_hit = manager.get_computed_blocks(b)
    assert (blocks, num_hit) == (prefix, 8)
    assert manager.allocate_slots(b, 1, blocks) is not None
    assert b.block_ids[:2] == prefix
    assert manager.num_free_blocks == 1


def test_allocate_slots_returns_none_without_side_effects() -> None:
    manager = KVCacheManager(4, BLOCK)
    pool = manager.block_pool
    a = make_request("a", list(range(9)))
    admit(manager, a)  # 3 blocks held, 2 of them cached
    prefix = a.block_ids[:2]
    manager.free(a)
    holder = make_request("h", [99] * 8)
    compute(manager, holder, 8)  # takes 2 blocks: the uncached tail of ``a`` and one never used
    assert manager.num_free_blocks == 2
    b = make_request("b", [*range(8), *range(100, 109)])  # 17 tokens: 2 hit blocks + 3 new needed
    blocks, num_hit = manager.get_computed_blocks(b)
    assert (blocks, num_hit) == (prefix, 8)
    free_before = pool.free_block_ids()
    refs_before = list(pool.ref_counts)
    assert manager.allocate_slots(b, 9, blocks) is None
    assert b.block_ids == []
    assert pool.free_block_ids() == free_before
    assert pool.ref_counts == refs_before
    assert manager.num_prefix_queries_tokens == 9 + 8  # only the two admissions that succeeded


def test_revived_hits_count_against_free_blocks() -> None:
    manager = KVCacheManager(3, BLOCK)
    a = make_request("a", list(range(9)))
    admit(manager, a)
    prefix = a.block_ids[:2]
    manager.free(a)  # all 3 free, 2 of them cached
    b = make_request("b", [*range(8), *range(20, 25)])  # 13 tokens: 2 hit + 2 new blocks = 4 > 3
    blocks, _ = manager.get_computed_blocks(b)
    assert blocks == prefix
    assert manager.allocate_slots(b, 5, blocks) is None
    assert manager.num_free_blocks == 3


def test_allocate_grows_the_table_only_when_a_block_fills() -> None:
    manager = KVCacheManager(8, BLOCK)
    a = make_request("a", list(range(5)))
    assert manager.allocate_slots(a, 5) == [0, 1]
    a.num_computed_tokens = 5
    a.append_output_token(7)
    assert manager.allocate_slots(a, 1) == []  # 6 tokens still fit in 2 blocks
    a.num_computed_tokens = 6
    a.append_output_token(7)
    a.num_computed_tokens = 7
    a.append_output_token(7)
    assert manager.allocate_slots(a, 1) == []  # 8 tokens fill 2 blocks exactly
    a.num_computed_tokens = 8
    a.append_output_token(7)
    assert manager.allocate_slots(a, 1) == [2]  # the 9th token opens a third block
    assert a.block_ids == [0, 1, 2]


def test_hit_rate_counters() -> None:
    manager = KVCacheManager(16, BLOCK)
    admit(manager, make_request("a", list(range(10))))
    admit(manager, make_request("b", list(range(10))))
    assert manager.num_prefix_queries_tokens == 20
    assert manager.num_prefix_hit_tokens == 8
    assert manager.prefix_cache_hit_rate == 8 / 20


def test_prefix_caching_disabled() -> None:
    manager = KVCacheManager(8, BLOCK, enable_prefix_caching=False)
    admit(manager, make_request("a", list(range(10))))
    assert manager.get_computed_blocks(make_request("b", list(range(10)))) == ([], 0)
    assert manager.prefix_cache_hit_rate == 0.0


def test_free_forgets_per_request_state() -> None:
    manager = KVCacheManager(8, BLOCK)
    a = make_request("a", list(range(10)))
    admit(manager, a)
    manager.free(a)
    assert manager.num_free_blocks == 8
    assert manager.req_id_to_block_hashes == {}
    assert manager.req_id_to_num_cached_blocks == {}
    assert manager.usage == 0.0
