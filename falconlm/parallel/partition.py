"""Splitting n things (heads, KV groups, rows, vocabulary entries) over ranks, evenly or as evenly as possible.

Falcon-7B has 71 query heads: on 2 ranks that is 36 + 35. vLLM refuses such counts; we split them unevenly, the
first ``n % world`` ranks taking one more.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Partition:
    """Rank ``rank``'s contiguous share ``[start, stop)`` of ``total`` things."""

    start: int
    stop: int
    total: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def as_slice(self) -> slice:
        return slice(self.start, self.stop)


def partition(total: int, world_size: int, rank: int, multiple: int = 1) -> Partition:
    """Rank ``rank``'s share of ``total`` items split over ``world_size`` ranks in units of ``multiple`` items.

    ``multiple`` keeps a share on unit boundaries (a quantization group, a packed int4 byte): ``total`` must then
    be a multiple of it. The first ``units % world_size`` ranks take one unit more. A rank may get nothing when
    there are fewer units than ranks.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    if multiple < 1 or total % multiple:
        raise ValueError(f"{total} items do not split into units of {multiple}")
    units = total // multiple
    base, extra = divmod(units, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return Partition(start * multiple, stop * multiple, total)
