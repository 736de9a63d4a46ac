"""KVCacheManager: maps requests to blocks of ``block_size`` token slots, with block-level prefix caching.

Pure Python (no torch). A full block is identified by a chained hash: the hash of its tokens and of the
hash of the block before it, so it names the whole prefix up to and including that block. A block is
registered in the prefix cache only once its KV has been computed (``cache_full_blocks``, called by the
scheduler after each step), so a hit never points at KV that is still being written.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from falconlm.engine.block_pool import BlockPool
from falconlm.engine.stats import KVCacheStats

if TYPE_CHECKING:
    from falconlm.engine.request import Request


def block_hash(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Chained content hash of one full block (sha256, so crafted prompts cannot collide with others)."""
    digest = hashlib.sha256()
    if parent_hash is not None:
        digest.update(parent_hash.to_bytes(32, "little"))
    digest.update(array("q", token_ids).tobytes())
    return int.from_bytes(digest.digest(), "little")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Allocates and frees a request's blocks, and finds its prompt prefix among cached blocks."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        prefix_salt: Callable[[int], int | None] | None = None,
    ) -> None:
        """``prefix_salt(num_prompt_tokens)``: what else a request's cached KV depends on (an int that starts its
        hash chain), or None; with dynamic RoPE scaling a long prompt's keys depend on its length."""
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_salt = prefix_salt
        self.block_pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.req_id_to_block_hashes: dict[str, list[int]] = {}
        self.req_id_to_num_cached_blocks: dict[str, int] = {}  # leading blocks already registered
        self.num_prefix_queries_tokens = 0
        self.num_prefix_hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Share of admitted tokens served from the prefix cache."""
        if self.num_prefix_queries_tokens == 0:
            return 0.0
        return self.num_prefix_hit_tokens / self.num_prefix_queries_tokens

    def stats(self) -> KVCacheStats:
        """A frozen snapshot of the pool's occupancy and the prefix cache's counters."""
        return KVCacheStats(
            self.num_blocks,
            self.num_free_blocks,
            self.num_prefix_queries_tokens,
            self.num_prefix_hit_tokens,
            prefix_cache_enabled=self.enable_prefix_caching,
            prefix_cache_disabled_reason="" if self.enable_prefix_caching else "turned off by the engine settings",
        )

    def num_blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest run of leading full blocks already cached, and the number of tokens they cover.

        Capped below ``num_tokens``: the last token is always computed, so there are logits to sample from.
        Nothing for a request that asks for prompt logprobs: its whole prompt must be computed.
        """
        if not self.enable_prefix_caching or request.skips_prefix_cache:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._block_hashes(request, max_blocks)
        block_ids: list[int] = []
        for h in hashes[:max_blocks]:
            block_id = self.block_pool.get_cached_block(h)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids, len(block_ids) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: Sequence[int] = ()
    ) -> list[int] | None:
        """Grow the request's table to hold ``num_computed_tokens`` + cached + ``num_new_tokens`` tokens.

        ``new_computed_blocks`` (a prefix-cache hit, on admission) are touched and put first in the table.
        Returns the newly allocated block ids, or None, changing nothing, when too few blocks are free.
        """
        pool = self.block_pool
        num_cached = len(new_computed_blocks)
        num_needed = request.num_computed_tokens + num_cached * self.block_size + num_new_tokens
        num_new_blocks = max(0, self.num_blocks_for(num_needed) - len(request.block_ids) - num_cached)
        # A hit on a free cached block takes it out of the free queue too.
        num_revived = sum(1 for block_id in new_computed_blocks if pool.ref_count(block_id) == 0)
        if num_new_blocks + num_revived > pool.num_free_blocks:
            return None
        if not request.block_ids:  # admission (first, or after preemption)
            self.num_prefix_queries_tokens += request.num_tokens
            self.num_prefix_hit_tokens += num_cached * self.block_size
            self.req_id_to_num_cached_blocks[request.request_id] = num_cached
        pool.touch(new_computed_blocks)
        new_block_ids = pool.get_new_blocks(num_new_blocks)
        request.block_ids.extend(new_computed_blocks)
        request.block_ids.extend(new_block_ids)
        return new_block_ids

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's full blocks whose KV is computed (covered by ``num_computed_tokens``)."""
        if not self.enable_prefix_caching:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_ids))
        start = self.req_id_to_num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request, num_full)
        for i in range(start, num_full):
            self.block_pool.cache_full_block(request.block_ids[i], hashes[i])
        self.req_id_to_num_cached_blocks[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first, and forget its per-request state."""
        self.block_pool.free_blocks(reversed(request.block_ids))
        request.block_ids.clear()
        self.req_id_to_block_hashes.pop(request.request_id, None)
        self.req_id_to_num_cached_blocks.pop(request.request_id, None)

    def _block_hashes(self, request: Request, num_blocks: int) -> list[int]:
        """The request's chained block hashes, extended (once, incrementally) to at least ``num_blocks``."""
        hashes = self.req_id_to_block_hashes.setdefault(request.request_id, [])
        token_ids = request.all_token_ids
        size = self.block_size
        salt = None if self.prefix_salt is None else self.prefix_salt(request.num_prompt_tokens)
        root = None if salt is None else block_hash(None, [-1, salt])  # no real block holds a negative token id
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(block_hash(hashes[-1] if hashes else root, token_ids[i * size : (i + 1) * size]))
        return hashes
