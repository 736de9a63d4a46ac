"""Tensor-parallel Falcon-H1: attention heads, SSM heads and the MLP split over ranks, every layer.

* Attention (grouped-query, like Falcon3; ``heads.py``): whole KV groups per rank when there are at least as many
  as ranks, else one KV head per rank (replicated on the ranks sharing it) and a share of its query heads.
  q/k/v column-parallel, ``o_proj`` row-parallel; the KV cache holds the rank's KV heads.
* The Mamba-2 mixer: :mod:`falconlm.parallel.h1_mixer` (SSM heads split, B/C groups split or replicated, an
  exact split norm).
* The layer adds its Mamba and attention outputs, each times its multiplier, before one all-reduce (both
  ``out_proj`` and ``o_proj`` are built not to reduce), then each bias once, times its multiplier.
* The MLP: ``gate_proj`` / ``up_proj`` column-parallel, ``down_proj`` row-parallel.
* Embedding and head vocabulary-parallel. The µP multipliers scale whole tensors (or whole parts of in_proj's
  output), so each rank applies them to its slices unchanged.

The per-rank config (:class:`H1RankConfig`) reports this rank's attention heads, KV heads, MLP width, SSM heads,
d_ssm and held B/C groups, so the engine sizes this rank's KV cache and recurrent state from it as usual.
Row-parallel inputs split only on int4 group boundaries (``multiple``), else a ValueError naming the layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..model.attention import AttentionContext
from ..model.checkpoint import _SkipInit
from ..model.falcon_h1 import FalconH1DecoderLayer, FalconH1ForCausalLM, Rope
from ..model.h1_config import FalconH1Config
from ..model.recurrent import RecurrentBatch
from .falcon import VOCAB_ROWS, ColumnMultiple, no_constraint
from .h1_mixer import ParallelH1Mixer, SsmShare, ssm_rank_fields, ssm_share
from .heads import HeadSplit, split_features, split_heads
from .layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    Shard,
    VocabParallelEmbedding,
    VocabParallelHead,
    vocab_partition,
    vocab_sizes,
)
from .partition import Partition
from .state import ParallelState


class H1Split:
    """One rank's attention heads, SSM heads and MLP features (``multiple(kind)``: where a row-parallel matrix's
    input may be split, for int4 groups)."""

    def __init__(self, config: FalconH1Config, state: ParallelState, multiple: ColumnMultiple = no_constraint) -> None:
        world, rank = state.world_size, state.rank
        self.attention: HeadSplit = split_heads(
            config.num_attention_heads, config.num_key_value_heads, config.head_dim, world, rank,
            multiple("self_attn.o_proj"), "self_attn.o_proj",
        )  # fmt: skip
        self.ssm: SsmShare = ssm_share(config, state, multiple("mamba.out_proj"))
        f = config.intermediate_size
        if f < world:
            raise ValueError(f"intermediate_size ({f}) must be at least the tensor-parallel size ({world})")
        kind = "feed_forward.down_proj"
        self.mlp = Partition(*split_features(f, world, rank, multiple(kind), kind), f)

    def rank_config(self, config: FalconH1Config) -> H1RankConfig:
        """This rank's config: its heads, KV heads, MLP width and Mamba sizes; everything else the full model's."""
        values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        values.update(
            num_attention_heads=self.attention.local_heads,
            num_key_value_heads=self.attention.local_groups,
            intermediate_size=self.mlp.size,
            **ssm_rank_fields(self.ssm),
        )
        return H1RankConfig(**values)


@dataclass
class H1RankConfig(FalconH1Config):
    """One rank's share of a :class:`FalconH1Config`. A rank's SSM heads need not be a multiple of the B/C groups
    it holds (with fewer groups than ranks, its heads may cover its groups unevenly: the mixer then hands each head
    its group's B and C), so that one check is left to the full config; every other check still runs."""

    def _validate(self) -> None:
        groups = self.mamba_n_groups
        self.mamba_n_groups = 1
        try:
            super()._validate()
        finally:
            self.mamba_n_groups = groups


def h1_rank_config(
    config: FalconH1Config, state: ParallelState, multiple: ColumnMultiple = no_constraint
) -> FalconH1Config:
    """The per-rank config :func:`build_h1_shard` builds this rank's model from."""
    return H1Split(config, state, multiple).rank_config(config)


class ParallelH1DecoderLayer(FalconH1DecoderLayer):
    """An H1 layer whose Mamba and attention outputs (both row-parallel, built with ``reduce=False``) are summed,
    with their multipliers, before one all-reduce; each bias is then added once, scaled by its multiplier."""

    def __init__(self, rank_config: FalconH1Config, layer_idx: int, state: ParallelState) -> None:
        super().__init__(rank_config, layer_idx)
        self.state = state

    def forward(self, x: torch.Tensor, rope: Rope, attention: AttentionContext, rows: RecurrentBatch) -> torch.Tensor:
        h = self.input_layernorm(x)
        ssm = self.mamba(h, rows) * self.ssm_out_multiplier
        attn = self.self_attn(h * self.attention_in_multiplier, rope, attention) * self.attention_out_multiplier
        mixed = self.state.all_reduce(ssm + attn)
        for bias, scale in (
            (self.mamba.out_proj.bias, self.ssm_out_multiplier),
            (self.self_attn.o_proj.bias, self.attention_out_multiplier),
        ):
            if bias is not None:
                mixed = mixed + bias * scale
        x = x + mixed
        return x + self.feed_forward(self.pre_ff_layernorm(x))


def build_h1_shard(
    config: FalconH1Config, state: ParallelState, multiple: ColumnMultiple = no_constraint
) -> FalconH1ForCausalLM:
    """This rank's Falcon-H1 on the meta device, parameters named as in the full model, each recording its slice
    (``tp_shards``); its ``config`` is the per-rank one."""
    split = H1Split(config, state, multiple)
    rank_config = split.rank_config(config)
    heads, d, h = split.attention, config.head_dim, config.hidden_size
    a_bias, m_bias = config.attention_bias, config.mlp_bias
    features = Shard.of(split.mlp, 0)
    vocab = vocab_partition(config.vocab_size, state, multiple=VOCAB_ROWS)
    with torch.device("meta"), _SkipInit():
        model = FalconH1ForCausalLM(rank_config)
        for i in range(config.num_hidden_layers):
            layer = model.model.layers[i] = ParallelH1DecoderLayer(rank_config, i, state)
            layer.mamba = ParallelH1Mixer(config, rank_config, i, split.ssm, state, reduce_output=False)
            attn, mlp = layer.self_attn, layer.feed_forward
            attn.q_proj = ColumnParallelLinear(h, heads.query_rows(d), a_bias, state)
            attn.k_proj = ColumnParallelLinear(h, heads.kv_rows(d), a_bias, state)
            attn.v_proj = ColumnParallelLinear(h, heads.kv_rows(d), a_bias, state)
            attn.o_proj = RowParallelLinear(heads.output_columns(d), h, a_bias, state, reduce=False)
            mlp.gate_proj = ColumnParallelLinear(h, features, m_bias, state)
            mlp.up_proj = ColumnParallelLinear(h, features, m_bias, state)
            mlp.down_proj = RowParallelLinear(Shard.of(split.mlp, 1), h, m_bias, state)
        model.model.embed_tokens = VocabParallelEmbedding(vocab, h, state)
        model.lm_head = VocabParallelHead(h, vocab, state, vocab_sizes(config.vocab_size, state, VOCAB_ROWS))
        model.tie_weights()
    return model
