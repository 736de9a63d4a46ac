"""Splitting n things (heads, KV groups, rows, vocabulary entries) over ranks, evenly or as evenly as possible.

Falcon-7B has 71 query heads: on 2 ranks that is 36 + 35. vLLM refuses such counts; we split them unevenly, the
first ``n % world`` ranks taking one more.
"""

from __future__ import annotations

from collections.abc import Callable
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


UNITS_TO_ALIGN = 8  # a preferred alignment is taken when every rank gets at least this many units of it


def split_at(total: int, world: int, rank: int, allowed: Callable[[int], bool], what: str) -> tuple[int, int]:
    """Rank ``rank``'s ``[start, stop)`` of ``total`` items when a boundary may fall only where ``allowed``:
    the pieces between allowed boundaries are shared out as evenly as possible (the first ranks take one more).
    ValueError naming ``what`` when some rank would get nothing."""
    cuts = [0, *(i for i in range(1, total) if allowed(i)), total]
    pieces = len(cuts) - 1
    if pieces < world:
        raise ValueError(f"{what}: {total} cannot be split over {world} ranks on the boundaries it allows")
    share = partition(pieces, world, rank)
    return cuts[share.start], cuts[share.stop]


def aligned(total: int, world: int, rank: int, multiple: int, fallback: int = 1, what: str = "split") -> Partition:
    """Rank ``rank``'s share with interior boundaries on multiples of ``multiple`` (the last share may end off
    one) when there are at least :data:`UNITS_TO_ALIGN` of them per rank (so shares stay within one unit of even),
    else on multiples of ``fallback``."""
    if total >= UNITS_TO_ALIGN * world * multiple:
        start, stop = split_at(total, world, rank, lambda i: i % multiple == 0, what)
    else:
        start, stop = split_at(total, world, rank, lambda i: i % fallback == 0, what)
    return Partition(start, stop, total)
