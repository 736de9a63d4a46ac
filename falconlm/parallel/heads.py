"""Which attention heads, KV groups and MLP features a rank computes.

Grouped-query attention has G KV groups of ``queries_per_kv`` query heads each (falcon-spec §2). With G >= N
ranks every rank takes whole groups (8 groups on 3 ranks: 3, 3, 2). With G < N (multi-query: G = 1) the ranks
are spread over the groups, each rank takes one group, its K/V heads replicated on every rank that shares it,
and the group's query heads are split among those ranks (Falcon-7B's 71 heads on 2 ranks: 36 + 35).

A row-parallel layer after a split (attention's output projection, the MLP's down projection) reads only its
rank's input columns, so with int4 weights quantized in groups along the input a split may only fall on a group
boundary: ``multiple`` (in columns) says where a boundary may fall, and a split that cannot give every rank a
share on such boundaries is a ValueError naming the layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..quant.kernels.native import ACTIVATION_BLOCK
from .layers import Shard
from .partition import UNITS_TO_ALIGN, aligned, partition, split_at

# Shares whose widths are multiples of this many columns keep the native quantized kernels (their activation
# blocks, and torch's int8 pack) on every rank: splits prefer such boundaries when they can afford them.
PREFERRED_COLUMNS = ACTIVATION_BLOCK


def split_features(total: int, world: int, rank: int, multiple: int, what: str) -> tuple[int, int]:
    """An MLP's hidden features: interior boundaries on multiples of ``multiple`` columns, and of
    :data:`PREFERRED_COLUMNS` too where shares stay near even (``partition.aligned``)."""
    p = aligned(total, world, rank, math.lcm(multiple, PREFERRED_COLUMNS), multiple, what)
    return p.start, p.stop


@dataclass(frozen=True)
class HeadSplit:
    """One rank's attention heads: global query heads ``[head_start, head_stop)`` in KV groups
    ``[group_start, group_stop)``; ``shared`` when its one group is shared with other ranks (K/V replicated)."""

    num_heads: int
    num_groups: int
    head_start: int
    head_stop: int
    group_start: int
    group_stop: int

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_groups

    @property
    def local_heads(self) -> int:
        return self.head_stop - self.head_start

    @property
    def local_groups(self) -> int:
        return self.group_stop - self.group_start

    @property
    def shared(self) -> bool:
        return self.local_heads < self.local_groups * self.queries_per_kv

    def fused_qkv_rows(self, head_dim: int) -> Shard:
        """Rows of Falcon's fused QKV weight: G blocks of [queries_per_kv query heads, key, value]."""
        q, d = self.queries_per_kv, head_dim
        block = (q + 2) * d
        full = self.num_groups * block
        if not self.shared:
            return Shard(0, ((self.group_start * block, self.group_stop * block),), full)
        base = self.group_start * block
        first = self.head_start - self.group_start * q  # this rank's first head inside its group
        heads = (base + first * d, base + (first + self.local_heads) * d)
        return Shard(0, (heads, (base + q * d, base + block)), full)

    def query_rows(self, head_dim: int) -> Shard:
        """Rows of a separate Q projection (and columns of the output projection, with ``dim=1``)."""
        return Shard(0, ((self.head_start * head_dim, self.head_stop * head_dim),), self.num_heads * head_dim)

    def kv_rows(self, head_dim: int) -> Shard:
        """Rows of a separate K or V projection."""
        d = head_dim
        return Shard(0, ((self.group_start * d, self.group_stop * d),), self.num_groups * d)

    def output_columns(self, head_dim: int) -> Shard:
        """Input columns of the attention's output projection: this rank's query heads."""
        rows = self.query_rows(head_dim)
        return Shard(1, rows.ranges, rows.full)


def split_heads(
    num_heads: int, num_groups: int, head_dim: int, world: int, rank: int, multiple: int = 1, what: str = "heads"
) -> HeadSplit:
    """Rank ``rank``'s heads (see the module docstring); a boundary between ranks' heads falls only on a multiple
    of ``multiple`` output-projection columns (``what`` names the layer in the error when that is impossible),
    and on one of :data:`PREFERRED_COLUMNS` too where shares stay near even and every rank still gets one."""
    preferred = math.lcm(multiple, PREFERRED_COLUMNS)
    if preferred != multiple and num_heads * head_dim >= UNITS_TO_ALIGN * world * preferred:
        try:
            return split_heads(num_heads, num_groups, head_dim, world, rank, preferred, what)
        except ValueError:
            pass
    q = num_heads // num_groups
    unit = multiple // math.gcd(multiple, head_dim)  # heads per quantization boundary
    if num_groups >= world:
        g0, g1 = split_at(num_groups, world, rank, lambda g: g * q % unit == 0, what)
        return HeadSplit(num_heads, num_groups, g0 * q, g1 * q, g0, g1)
    # Fewer groups than ranks: the ranks are spread over the groups, each group's heads over its ranks.
    for g in range(num_groups):
        ranks = partition(world, num_groups, g)
        if ranks.start <= rank < ranks.stop:
            break
    base = g * q
    h0, h1 = split_at(q, ranks.size, rank - ranks.start, lambda h: (base + h) % unit == 0, what)
    return HeadSplit(num_heads, num_groups, base + h0, base + h1, g, g + 1)
