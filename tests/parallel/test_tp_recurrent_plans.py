"""The Falcon-Mamba and Falcon-H1 sharding plans: every head and channel on exactly one rank (or a KV head / B-C
group replicated where it must be), per-rank configs that size the rank's state, clear errors where a split is
impossible. No processes: the plans are plain arithmetic on (rank, world size)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from falconlm.model.h1_config import FalconH1Config
from falconlm.model.mamba_config import FalconMambaConfig
from falconlm.parallel import ParallelState
from falconlm.parallel.h1 import H1Split, h1_rank_config
from falconlm.parallel.h1_mixer import ssm_share
from falconlm.parallel.mamba import mamba_rank_config


def _world(n: int) -> list[ParallelState]:
    return [ParallelState(r, n, torch.device("cpu")) for r in range(n)]


def _h1(**overrides) -> FalconH1Config:
    shape = dict(
        vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=8, mamba_d_ssm=48, mamba_n_heads=6, mamba_n_groups=2, mamba_d_state=4,
    )  # fmt: skip
    return FalconH1Config(**{**shape, **overrides})


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_mamba_ranks_split_the_channels_and_their_state(world: int) -> None:
    config = FalconMambaConfig(vocab_size=50, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2)
    locals_ = [mamba_rank_config(config, s) for s in _world(world)]
    assert sum(c.intermediate_size for c in locals_) == config.intermediate_size
    assert max(c.intermediate_size for c in locals_) - min(c.intermediate_size for c in locals_) <= 1
    assert sum(c.state_bytes_per_sequence() for c in locals_) == config.state_bytes_per_sequence()
    assert all(c.time_step_rank == config.time_step_rank for c in locals_)


@pytest.mark.parametrize(
    ("groups", "heads", "world"), [(1, 6, 2), (2, 6, 3), (2, 8, 3), (3, 6, 2), (4, 8, 3), (6, 6, 4), (1, 4, 4)]
)
def test_h1_ssm_heads_each_on_one_rank_with_their_groups(groups: int, heads: int, world: int) -> None:
    config = _h1(mamba_n_heads=heads, mamba_n_groups=groups, mamba_d_ssm=8 * heads)
    shares = [ssm_share(config, s) for s in _world(world)]
    assert [s.heads.start for s in shares] == [0] + [s.heads.stop for s in shares[:-1]]
    assert shares[-1].heads.stop == heads and all(s.heads.size for s in shares)
    per_group = heads // groups
    for s in shares:
        held = range(s.groups.start, s.groups.stop)
        assert {h // per_group for h in range(s.heads.start, s.heads.stop)} == set(held)  # exactly the groups read
        if groups >= world:  # whole groups, never shared
            assert s.heads.start % per_group == 0 and s.heads.stop % per_group == 0
    assert len({s.norm_spans_ranks for s in shares}) == 1  # a collective: every rank must agree
    # the per-rank configs size the rank's recurrent state: the SSM state splits, B/C conv channels may repeat
    locals_ = [h1_rank_config(config, s) for s in _world(world)]
    assert sum(c.ssm_state_elements() for c in locals_) == config.ssm_state_elements()
    assert sum(c.mamba_d_ssm for c in locals_) == config.mamba_d_ssm
    assert all(c.conv_dim == c.mamba_d_ssm + 2 * c.mamba_n_groups * c.mamba_d_state for c in locals_)


@pytest.mark.parametrize(("q", "kv", "world"), [(8, 2, 2), (8, 2, 3), (6, 3, 2), (8, 1, 3), (8, 8, 3), (4, 2, 4)])
def test_h1_rank_configs_hold_the_ranks_heads_and_features(q: int, kv: int, world: int) -> None:
    config = _h1(num_attention_heads=q, num_key_value_heads=kv)
    locals_ = [h1_rank_config(config, s) for s in _world(world)]
    assert sum(c.intermediate_size for c in locals_) == config.intermediate_size
    assert sum(c.num_attention_heads for c in locals_) == q  # each query head on one rank
    assert all(c.queries_per_kv * c.num_key_value_heads == c.num_attention_heads for c in locals_)
    assert all(c.head_dim == config.head_dim for c in locals_)


def test_int4_groups_move_the_ssm_split_to_their_boundaries() -> None:
    config = _h1(mamba_n_heads=6, mamba_n_groups=1, mamba_d_ssm=48)  # heads of 8 channels
    ssm = [H1Split(config, s, lambda kind: 16 if kind == "mamba.out_proj" else 1).ssm for s in _world(2)]
    assert [(s.heads.start, s.heads.stop) for s in ssm] == [(0, 4), (4, 6)]  # 3 + 3 would cut a group of 16
    with pytest.raises(ValueError, match=r"mamba\.out_proj"):
        H1Split(config, _world(4)[0], lambda kind: 16 if kind == "mamba.out_proj" else 1)


def test_impossible_splits_say_which_constraint() -> None:
    with pytest.raises(ValueError, match="mamba_n_heads \\(4\\) must be at least the tensor-parallel size \\(5\\)"):
        ssm_share(_h1(mamba_n_heads=4, mamba_n_groups=1, mamba_d_ssm=32), _world(5)[0])
    with pytest.raises(ValueError, match="intermediate_size \\(2\\) must be at least the tensor-parallel size \\(3\\)"):
        H1Split(_h1(intermediate_size=2), _world(3)[0])
    tiny = FalconMambaConfig(vocab_size=50, hidden_size=2, state_size=4, num_hidden_layers=1, expand=1)
    with pytest.raises(ValueError, match="intermediate_size \\(2\\) must be at least the tensor-parallel size \\(3\\)"):
        mamba_rank_config(tiny, _world(3)[0])


def test_a_rank_config_with_heads_covering_groups_unevenly_survives_a_rebuild() -> None:
    """8 SSM heads in 2 groups on 3 ranks: rank 1 holds heads 3-5, one of group 0 and two of group 1. Its config
    (3 heads, 2 groups) is rebuilt when a quantize-on-load records its recipe; that must not trip the full
    config's groups-divide-heads check, while the others still hold."""
    config = _h1(mamba_n_heads=8, mamba_n_groups=2, mamba_d_ssm=64)
    local = h1_rank_config(config, _world(3)[1])
    assert (local.mamba_n_heads, local.mamba_n_groups) == (3, 2)
    again = dataclasses.replace(local, extra={"quantization_config": {"quant_method": "falconlm"}})
    assert again.conv_dim == local.conv_dim == 3 * 8 + 2 * 2 * 4
    with pytest.raises(ValueError, match="head_dim"):
        dataclasses.replace(local, head_dim=7)
