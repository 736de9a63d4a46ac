"""The parallel layers on 2 and 3 gloo ranks equal their unsharded counterparts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from falconlm.parallel import ParallelState, partition
from falconlm.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    Shard,
    VocabParallelEmbedding,
    VocabParallelHead,
    parameter_shards,
    row_parallel_sum,
    vocab_sizes,
)
from falconlm.parallel.partition import Partition

from .world import run_world


def _full_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w_col": torch.randn(10, 8, generator=g),
        "b_col": torch.randn(10, generator=g),
        "w_row": torch.randn(6, 10, generator=g),
        "b_row": torch.randn(6, generator=g),
        "w2_row": torch.randn(6, 10, generator=g),
        "b2_row": torch.randn(6, generator=g),
        "emb": torch.randn(11, 6, generator=g),
        "x": torch.randn(2, 3, 8, generator=g),
        "ids": torch.randint(0, 11, (2, 5), generator=g),
    }


def _ranks_layers(state: ParallelState) -> dict[str, torch.Tensor]:
    t = _full_tensors()
    # The column layer takes two ranges (as a fused QKV shard would); the row layer reads the same columns.
    mid = partition(8, state.world_size, state.rank)
    rows = Shard(0, ((mid.start, mid.stop),), 10) if state.rank else Shard(0, ((mid.start, mid.stop), (8, 10)), 10)
    col = ColumnParallelLinear(8, rows, True, state)
    col.weight.data, col.bias.data = rows.take(t["w_col"]), rows.take(t["b_col"])
    cols = Shard(1, rows.ranges, 10)
    row = RowParallelLinear(cols, 6, True, state)
    row.weight.data, row.bias.data = cols.take(t["w_row"]), t["b_row"]
    row2 = RowParallelLinear(cols, 6, True, state)
    row2.weight.data, row2.bias.data = cols.take(t["w2_row"]), t["b2_row"]
    h = col(t["x"])
    vocab = partition(11, state.world_size, state.rank)
    emb = VocabParallelEmbedding(vocab, 6, state)
    emb.weight.data = Shard.of(vocab, 0).take(t["emb"])
    head = VocabParallelHead(6, vocab, state, vocab_sizes(11, state))
    head.weight = emb.weight
    e = emb(t["ids"])
    return {
        "row": row(h),
        "sum": row_parallel_sum((row, h), (row2, h)),
        "emb": e,
        "logits": head(e),
        "names": sorted(parameter_shards(torch.nn.ModuleDict({"a": col, "b": row}))),
    }


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_parallel_layers_equal_unsharded(world: int) -> None:
    t = _full_tensors()
    h = F.linear(t["x"], t["w_col"], t["b_col"])
    row = F.linear(h, t["w_row"], t["b_row"])
    row2 = F.linear(h, t["w2_row"], t["b2_row"])
    emb = F.embedding(t["ids"], t["emb"])
    for got in run_world(_ranks_layers, world, timeout=90):
        torch.testing.assert_close(got["row"], row, rtol=0, atol=1e-5)
        torch.testing.assert_close(got["sum"], row + row2, rtol=0, atol=1e-5)
        torch.testing.assert_close(got["emb"], emb, rtol=0, atol=0)
        torch.testing.assert_close(got["logits"], emb @ t["emb"].T, rtol=0, atol=1e-5)
        assert got["names"] == ["a.bias", "a.weight", "b.weight"]


def test_shard_take_and_divided() -> None:
    full = torch.arange(24).view(2, 12)
    s = Shard(1, ((0, 4), (8, 12)), 12)
    assert s.size == 8 and not s.is_whole
    assert s.take(full).tolist() == [[0, 1, 2, 3, 8, 9, 10, 11], [12, 13, 14, 15, 20, 21, 22, 23]]
    assert s.divided(4).ranges == ((0, 1), (2, 3))
    with pytest.raises(ValueError, match=r"qkv.*units of 8"):
        s.divided(8, "qkv")
    with pytest.raises(ValueError, match="outside"):
        Shard(0, ((3, 13),), 12)
    assert Shard.of(Partition(2, 5, 7), 0, unit=3).ranges == ((6, 15),)
    assert Shard.whole(0, 5).is_whole
