"""Tensor-parallel Falcon-H1 Mamba-2 mixer: every rank runs a contiguous share of the SSM heads.

``in_proj`` packs [z, x, B, C, Δ]: a rank keeps the z and x channels of its heads, the B and C of the groups its
heads read, and its heads' Δ. B and C belong to ``mamba_n_groups`` groups of consecutive heads:

* ``n_groups >= world``: the heads split in whole groups (the first ranks taking one group more when the world
  does not divide them), so each rank holds only its groups' B and C;
* ``n_groups < world``: the heads split on their own (the first ranks taking one head more); a rank holds the
  B and C of every group its heads touch, replicated on the ranks that share the group. When its heads do not
  cover those groups evenly, each head is handed its own group's B and C before the scan.

The conv over [x, B, C] is per-channel, so it splits with those channels; A_log, D and dt_bias split by head;
``out_proj`` is row-parallel. The gated RMS norm normalises over each group's d_ssm / n_groups channels: when a
group's heads sit on more than one rank, its sum of squares is all-reduced (:class:`SplitGatedRMSNorm`), so the
norm stays exact. The ``ssm_multipliers`` scale whole parts of in_proj's output (z, x, B, C, Δ), so each rank
applies them to its share of each part unchanged. With int4 weights, a split between ranks also falls only on
``out_proj``'s quantization-group boundaries (a ValueError naming ``mamba.out_proj`` when no such split exists).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model.falcon_h1 import FalconH1Mixer
from ..model.h1_config import FalconH1Config
from ..model.recurrent import RecurrentBatch
from .layers import ColumnParallelLinear, RowParallelLinear, Shard, set_shards
from .partition import Partition, split_at
from .state import ParallelState


@dataclass(frozen=True)
class SsmShare:
    """One rank's SSM heads and the B/C groups they read (``groups``: a contiguous range of group indices)."""

    heads: Partition
    groups: Partition
    heads_per_group: int
    head_dim: int
    d_state: int
    norm_spans_ranks: bool  # some norm group (one B/C group's channels) is split between ranks, on any rank

    @property
    def channels(self) -> tuple[int, int]:
        """This rank's x / z / norm channels, [start, stop) of d_ssm."""
        return self.heads.start * self.head_dim, self.heads.stop * self.head_dim

    def head_groups(self) -> list[int]:
        """For each local head, the index of its group among the groups this rank holds."""
        return [h // self.heads_per_group - self.groups.start for h in range(self.heads.start, self.heads.stop)]

    @property
    def groups_even(self) -> bool:
        """Whether every held group has the same number of local heads (the scan's own grouping then holds)."""
        counts = [self.head_groups().count(g) for g in range(self.groups.size)]
        return len(set(counts)) == 1


def ssm_share(config: FalconH1Config, state: ParallelState, multiple: int = 1) -> SsmShare:
    """This rank's SSM heads and groups (see the module docstring). ``multiple``: where ``out_proj``'s input
    columns may be split (int4 groups). ValueError when some rank would get no head."""
    heads, groups, world = config.mamba_n_heads, config.mamba_n_groups, state.world_size
    per_group, d_head = heads // groups, config.mamba_d_head
    if groups < world and heads < world:
        raise ValueError(
            f"mamba_n_heads ({heads}) must be at least the tensor-parallel size ({world}): every rank needs one "
            "SSM head"
        )

    def allowed(h: int) -> bool:  # whole groups when there are enough of them; int4 group boundaries always
        return (groups < world or h % per_group == 0) and h * d_head % multiple == 0

    shares = [Partition(*split_at(heads, world, r, allowed, "mamba.out_proj"), heads) for r in range(world)]
    mine = shares[state.rank]
    first, last = mine.start // per_group, math.ceil(mine.stop / per_group)
    spans = any(s.stop % per_group for s in shares)  # every rank must agree: the split norm is a collective
    return SsmShare(mine, Partition(first, last, groups), per_group, d_head, config.mamba_d_state, spans)


def ssm_rank_fields(share: SsmShare) -> dict[str, int]:
    """The per-rank config's Mamba sizes: its heads, their channels, the groups it holds (so ``conv_dim``, the
    conv and SSM state shapes and in_proj's width are this rank's)."""
    return {
        "mamba_n_heads": share.heads.size,
        "mamba_d_ssm": share.heads.size * share.head_dim,
        "mamba_n_groups": share.groups.size,
    }


def _mixer_shards(config: FalconH1Config, share: SsmShare) -> dict[str, Shard]:
    """Which slice of each full mixer tensor this rank holds, by the tensor's name inside the mixer."""
    d, gn = config.mamba_d_ssm, config.mamba_n_groups * config.mamba_d_state
    c0, c1 = share.channels
    b0, b1 = share.groups.start * share.d_state, share.groups.stop * share.d_state
    h0, h1 = share.heads.start, share.heads.stop
    # in_proj rows: [z | x | B | C | Δ]; conv channels: [x | B | C]
    in_proj = ((c0, c1), (d + c0, d + c1), (2 * d + b0, 2 * d + b1), (2 * d + gn + b0, 2 * d + gn + b1),
               (2 * d + 2 * gn + h0, 2 * d + 2 * gn + h1))  # fmt: skip
    conv = ((c0, c1), (d + b0, d + b1), (d + gn + b0, d + gn + b1))
    return {
        "in_proj": Shard(0, in_proj, config.in_proj_features),
        "conv": Shard(0, conv, config.conv_dim),
        "heads": Shard.of(share.heads, 0),
        "channels": Shard(0, ((c0, c1),), d),
        "out_proj": Shard(1, ((c0, c1),), d),
    }


class SplitGatedRMSNorm(nn.Module):
    """Mamba-2's gated RMS norm when a norm group's channels sit on several ranks: each rank sums the squares of
    its channels per group, the sums are all-reduced, and every channel is scaled by its whole group's RMS."""

    def __init__(self, share: SsmShare, eps: float, norm_before_gate: bool, state: ParallelState) -> None:
        super().__init__()
        c0, c1 = share.channels
        self.weight = nn.Parameter(torch.ones(c1 - c0))
        self.eps = eps
        self.norm_before_gate = norm_before_gate
        self.state = state
        self.num_groups = share.groups.total
        self.group_size = share.heads_per_group * share.head_dim
        self.channels = (c0, c1)
        self._channel_group: torch.Tensor | None = None  # each local channel's group; made on the first call

    def channel_group(self, device: torch.device) -> torch.Tensor:
        if self._channel_group is None or self._channel_group.device != device:
            self._channel_group = torch.arange(*self.channels, device=device) // self.group_size
        return self._channel_group

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        y = y.float()
        if not self.norm_before_gate:
            y = y * F.silu(z.float())
        group = self.channel_group(y.device)
        squares = y.new_zeros(y.shape[0], self.num_groups).index_add_(1, group, y * y)
        self.state.all_reduce(squares)
        scale = torch.rsqrt(squares / self.group_size + self.eps)[:, group]
        y = self.weight * (y * scale)
        if self.norm_before_gate:
            y = y * F.silu(z.float())
        return y.to(dtype)


class ParallelH1Mixer(FalconH1Mixer):
    """The H1 Mamba-2 mixer over this rank's heads: ``config`` is the full model's, ``rank_config`` this rank's
    (:func:`ssm_rank_fields`); parameter names are the unsharded mixer's. With ``reduce_output`` False it returns
    ``out_proj``'s partial product (no all-reduce, no bias): the decoder layer reduces it with attention's."""

    def __init__(
        self, config: FalconH1Config, rank_config: FalconH1Config, layer_idx: int, share: SsmShare,
        state: ParallelState, reduce_output: bool = True,
    ) -> None:  # fmt: skip
        super().__init__(rank_config, layer_idx)
        shards = _mixer_shards(config, share)
        self.in_proj = ColumnParallelLinear(config.hidden_size, shards["in_proj"], config.mamba_proj_bias, state)
        set_shards(self.conv1d, weight=shards["conv"], bias=shards["conv"] if config.mamba_conv_bias else None)
        set_shards(self, dt_bias=shards["heads"], A_log=shards["heads"], D=shards["heads"])
        self.out_proj = RowParallelLinear(
            shards["out_proj"], config.hidden_size, config.projectors_bias, state, reduce=reduce_output
        )
        self.head_groups = None if share.groups_even else share.head_groups()  # each head's held group
        self._head_index: torch.Tensor | None = None
        if rank_config.mamba_rms_norm:
            if share.norm_spans_ranks:
                self.norm = SplitGatedRMSNorm(share, config.rms_norm_eps, config.mamba_norm_before_gate, state)
            set_shards(self.norm, weight=shards["channels"])

    def _scan(
        self, xs: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, rows: RecurrentBatch
    ) -> torch.Tensor:
        if self.head_groups is not None:  # heads spread unevenly over the held groups: one B and C per head
            if self._head_index is None or self._head_index.device != B.device:
                self._head_index = torch.tensor(self.head_groups, device=B.device)
            B = B.view(B.shape[0], -1, self.d_state)[:, self._head_index].flatten(1)
            C = C.view(C.shape[0], -1, self.d_state)[:, self._head_index].flatten(1)
        return super()._scan(xs, dt, B, C, rows)
