"""Tensor-parallel Falcon-Mamba / Mamba-1: every rank holds a contiguous share of the inner channels (d_inner).

Per mixer, with this rank's channels ``[c0, c1)`` of D = intermediate_size:

* ``in_proj`` column-parallel: rows ``[c0, c1)`` of its x half and the same rows of its z half;
* ``conv1d``, ``dt_proj`` (its output rows and bias), ``A_log`` and ``D``: the same channels (all per-channel);
* ``x_proj`` row-parallel: its input columns ``[c0, c1)``; the all-reduce gives every rank the full Δ (rank R),
  B and C, so Falcon-Mamba's RMS norms over them stay exact;
* ``out_proj`` row-parallel (its bias, if any, added once after the all-reduce).

The embedding and the head are vocabulary-parallel (a tied head shares the embedding's slice). A rank's recurrent
state holds only its channels (conv state [K-1, c1-c0], SSM state [N, c1-c0]): the per-rank config reports
``intermediate_size = c1 - c0``, so the engine's state pool allocates just that share. Channels split unevenly
(the first ranks taking one more) when D does not divide the world.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..model.checkpoint import _SkipInit
from ..model.falcon_mamba import FalconMambaForCausalLM, FalconMambaMixer
from ..model.mamba_config import FalconMambaConfig
from .falcon import VOCAB_ROWS, ColumnMultiple, no_constraint
from .heads import split_features
from .layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    Shard,
    VocabParallelEmbedding,
    VocabParallelHead,
    set_shards,
    vocab_partition,
    vocab_sizes,
)
from .partition import Partition
from .state import ParallelState

ROW_PARALLEL = ("mixer.x_proj", "mixer.out_proj")  # the matrices whose input (the channels) is split


def mamba_channels(
    config: FalconMambaConfig, state: ParallelState, multiple: ColumnMultiple = no_constraint
) -> Partition:
    """This rank's share of the inner channels, split only where both row-parallel matrices allow (int4 groups);
    ValueError when some rank would get none."""
    d = config.intermediate_size
    if d < state.world_size:
        raise ValueError(
            f"intermediate_size ({d}) must be at least the tensor-parallel size ({state.world_size}): "
            "every rank needs one inner channel"
        )
    unit = math.lcm(*(multiple(kind) for kind in ROW_PARALLEL))
    start, stop = split_features(d, state.world_size, state.rank, unit, " and ".join(ROW_PARALLEL))
    return Partition(start, stop, d)


def mamba_rank_config(
    config: FalconMambaConfig, state: ParallelState, multiple: ColumnMultiple = no_constraint
) -> FalconMambaConfig:
    """The config this rank's model is built from: its own inner width, everything else unchanged."""
    return dataclasses.replace(config, intermediate_size=mamba_channels(config, state, multiple).size)


def shard_mamba_mixer(mixer: FalconMambaMixer, config: FalconMambaConfig, ch: Partition, state: ParallelState) -> None:
    """Turn a mixer built from the per-rank config into this rank's shard of the full one (module docstring)."""
    h, d = config.hidden_size, config.intermediate_size
    own = Shard.of(ch, 0)
    mixer.in_proj = ColumnParallelLinear(
        h, Shard(0, ((ch.start, ch.stop), (d + ch.start, d + ch.stop)), 2 * d), config.use_bias, state
    )
    set_shards(mixer.conv1d, weight=own, bias=own if config.use_conv_bias else None)
    mixer.x_proj = RowParallelLinear(Shard.of(ch, 1), mixer.x_proj.out_features, False, state)
    set_shards(mixer.dt_proj, weight=own, bias=own)
    set_shards(mixer, A_log=own, D=own)
    mixer.out_proj = RowParallelLinear(Shard.of(ch, 1), h, config.use_bias, state)


def build_mamba_shard(
    config: FalconMambaConfig, state: ParallelState, multiple: ColumnMultiple = no_constraint
) -> FalconMambaForCausalLM:
    """This rank's Falcon-Mamba on the meta device, parameters named as in the full model, each recording its
    slice (``tp_shards``); its ``config`` is the per-rank one. ``multiple(kind)``: where a row-parallel matrix's
    input may be split (int4 groups)."""
    ch = mamba_channels(config, state, multiple)
    vocab = vocab_partition(config.vocab_size, state, multiple=VOCAB_ROWS)
    with torch.device("meta"), _SkipInit():
        model = FalconMambaForCausalLM(dataclasses.replace(config, intermediate_size=ch.size))
        for block in model.backbone.layers:
            shard_mamba_mixer(block.mixer, config, ch, state)
        model.backbone.embeddings = VocabParallelEmbedding(vocab, config.hidden_size, state)
        model.lm_head = VocabParallelHead(
            config.hidden_size, vocab, state, vocab_sizes(config.vocab_size, state, VOCAB_ROWS)
        )
        model.tie_weights()
    return model
