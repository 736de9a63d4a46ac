"""BlockPool: the KV pages (blocks) as ints, with ref counts, a free queue and the prefix-cache hash map.

Pure Python (no torch). Every verb is O(1) per block.

- A block is in the free queue exactly when its ref count is 0. The queue is in eviction order:
  least recently freed first. ``get_new_blocks`` pops from the front.
- A full block may carry a content hash (``hash_to_block``). A cached block that is freed keeps its hash
  while it waits in the free queue, so a later request can still hit it (``touch`` revives it); the hash is
  dropped only when ``get_new_blocks`` hands the block out again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class BlockPool:
    """Owns block ids ``0..num_blocks-1``: who holds them, which are free, which carry cached content."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self.block_to_hash: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        # Insertion order = eviction order; OrderedDict gives O(1) pop-front, remove and append.
        self._free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by some request (free cached blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self.ref_counts[block_id]

    def free_block_ids(self) -> list[int]:
        """The free queue, front (next evicted) first; for tests and debugging."""
        return list(self._free_queue)

    def get_new_blocks(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` blocks from the front of the free queue, each with ref count 1."""
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"asked for {num_blocks} blocks, only {self.num_free_blocks} free")
        block_ids = []
        for _ in range(num_blocks):
            block_id, _ = self._free_queue.popitem(last=False)
            self._evict(block_id)
            self.ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Add a holder to each block (a prefix-cache hit); a free block leaves the free queue."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self._free_queue[block_id]
            self.ref_counts[block_id] += 1

    def free_blocks(self, block_ids: Iterable[int]) -> None:
        """Drop a holder from each block, in the given order; blocks reaching 0 join the back of the queue.

        Callers pass a request's table in reverse, so a sequence's tail is evicted before its prefix.
        """
        for block_id in block_ids:
            if self.ref_counts[block_id] <= 0:
                raise ValueError(f"block {block_id} is already free")
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self._free_queue[block_id] = None

    def cache_full_block(self, block_id: int, block_hash: int) -> None:
        """Register a full, computed block under its chained hash; the first block to claim a hash keeps it."""
        if not self.enable_caching or self.block_to_hash[block_id] is not None:
            return
        if block_hash in self.hash_to_block:
            return
        self.block_to_hash[block_id] = block_hash
        self.hash_to_block[block_hash] = block_id

    def get_cached_block(self, block_hash: int) -> int | None:
        """The block holding this content, held or free, or None."""
        if not self.enable_caching:
            return None
        return self.hash_to_block.get(block_hash)

    def _evict(self, block_id: int) -> None:
        """Forget the cached content of a block that is being reused."""
        block_hash = self.block_to_hash[block_id]
        if block_hash is None:
            return
        self.block_to_hash[block_id] = None
        if self.hash_to_block.get(block_hash) == block_id:
            del self.hash_to_block[block_hash]
