"""Splitting heads, KV groups and features over ranks: uneven shares, quantization-group boundaries, errors."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from falconlm.parallel import partition
from falconlm.parallel.heads import split_features, split_heads


def _shares(world: int, fn: Callable[[int], tuple[int, int]]) -> list[tuple[int, int]]:
    return [fn(r) for r in range(world)]


def test_partition_uneven_and_in_units() -> None:
    assert [partition(71, 2, r).size for r in range(2)] == [36, 35]
    assert [(p.start, p.stop) for p in (partition(8, 3, r) for r in range(3))] == [(0, 3), (3, 6), (6, 8)]
    assert [(p.start, p.stop) for p in (partition(256, 3, r, multiple=64) for r in range(3))] == [
        (0, 128), (128, 192), (192, 256),
    ]  # fmt: skip
    assert partition(2, 3, 2).size == 0  # fewer units than ranks: the last rank gets nothing
    with pytest.raises(ValueError, match="units of 64"):
        partition(100, 2, 0, multiple=64)
    with pytest.raises(ValueError, match="not in a world"):
        partition(10, 2, 2)


def test_multi_query_heads_split_unevenly_with_kv_replicated() -> None:
    splits = [split_heads(71, 1, 64, 2, r) for r in range(2)]
    assert [(s.head_start, s.head_stop) for s in splits] == [(0, 36), (36, 71)]
    assert all(s.shared and s.local_groups == 1 for s in splits)
    # Fused rows: the rank's query heads, then the one group's key and value (the same on both ranks).
    assert splits[0].fused_qkv_rows(64).ranges == ((0, 36 * 64), (71 * 64, 73 * 64))
    assert splits[1].fused_qkv_rows(64).ranges == ((36 * 64, 71 * 64), (71 * 64, 73 * 64))
    assert splits[1].output_columns(64).ranges == ((36 * 64, 71 * 64),)
    assert [(s.head_start, s.head_stop) for s in (split_heads(7, 1, 8, 3, r) for r in range(3))] == [
        (0, 3), (3, 5), (5, 7),
    ]  # fmt: skip


def test_whole_groups_when_there_are_enough() -> None:
    splits = [split_heads(16, 8, 4, 3, r) for r in range(3)]
    assert [(s.group_start, s.group_stop) for s in splits] == [(0, 3), (3, 6), (6, 8)]
    assert [(s.head_start, s.head_stop) for s in splits] == [(0, 6), (6, 12), (12, 16)]
    assert not any(s.shared for s in splits)
    assert splits[1].fused_qkv_rows(4).ranges == ((3 * 4 * 4, 6 * 4 * 4),)  # blocks of (2 heads + k + v) x 4
    assert splits[2].kv_rows(4).ranges == ((24, 32),)


def test_fewer_groups_than_ranks_spreads_ranks_over_groups() -> None:
    splits = [split_heads(8, 2, 16, 3, r) for r in range(3)]  # group 0: ranks 0 and 1; group 1: rank 2
    assert [(s.group_start, s.head_start, s.head_stop) for s in splits] == [(0, 0, 2), (0, 2, 4), (1, 4, 8)]
    assert splits[1].fused_qkv_rows(16).ranges == ((2 * 16, 4 * 16), (4 * 16, 6 * 16))


def test_quantization_groups_move_or_forbid_boundaries() -> None:
    # head_dim 16, int4 groups of 64 columns: a boundary every 4 heads.
    assert [(s.head_start, s.head_stop) for s in (split_heads(8, 1, 16, 2, r, multiple=64) for r in range(2))] == [
        (0, 4), (4, 8),
    ]  # fmt: skip
    assert [(s.head_start, s.head_stop) for s in (split_heads(12, 1, 16, 3, r, 64) for r in range(3))] == [
        (0, 4), (4, 8), (8, 12),
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"self_attention\.dense"):
        split_heads(8, 1, 16, 3, 0, multiple=64, what="self_attention.dense")
    assert _shares(3, lambda r: split_features(512, 3, r, 32, "mlp")) == [(0, 192), (192, 352), (352, 512)]
    assert _shares(2, lambda r: split_features(100, 2, r, 32, "mlp")) == [(0, 64), (64, 100)]
    with pytest.raises(ValueError, match=r"mlp\.dense_4h_to_h"):
        split_features(64, 3, 0, 32, "mlp.dense_4h_to_h")
    with pytest.raises(ValueError, match="heads"):
        split_heads(4, 4, 8, 5, 0)  # one query head per group cannot be shared by two ranks


def test_splits_prefer_native_kernel_boundaries() -> None:
    from falconlm.parallel.layers import vocab_partition, vocab_sizes
    from falconlm.parallel.state import ParallelState

    # 1056 features on 2 ranks: 544 + 512 (multiples of 32 columns) rather than 528 + 528; 40 is too narrow.
    assert _shares(2, lambda r: split_features(1056, 2, r, 1, "mlp")) == [(0, 544), (544, 1056)]
    assert _shares(2, lambda r: split_features(40, 2, r, 1, "mlp")) == [(0, 20), (20, 40)]
    three = ParallelState(0, 3, torch.device("cpu"))
    assert vocab_sizes(65024, three, 16) == [21680, 21680, 21664]
    assert vocab_sizes(101, three) == [34, 34, 33]
    assert vocab_partition(65024, three, 1, 16).start == 21680
