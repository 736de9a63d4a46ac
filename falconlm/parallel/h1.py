"""Tensor-parallel Falcon-H1: attention heads, SSM heads and the MLP split over ranks, every layer.

* Attention (grouped-query, like Falcon3): with at least as many KV heads as ranks, the KV heads split (the first
  ranks taking one more) and each rank keeps the query heads that read them; with fewer, each KV head is held by
  a block of consecutive ranks that split its query heads, so every rank holds one KV head (replicated in its
  block). q/k/v are column-parallel, ``o_proj`` row-parallel. The KV cache holds the rank's KV heads.
* The Mamba-2 mixer: :mod:`falconlm.parallel.h1_mixer` (SSM heads split, B/C groups split or replicated, an
  exact split norm).
* The MLP: ``gate_proj`` / ``up_proj`` column-parallel, ``down_proj`` row-parallel.
* Embedding and head vocabulary-parallel. The µP multipliers scale whole tensors (or whole parts of in_proj's
  output), so each rank applies them to its slices unchanged.

The per-rank config (:func:`h1_rank_config`) reports this rank's attention heads, KV heads, MLP width, SSM heads,
d_ssm and held B/C groups, so the engine sizes this rank's KV cache and recurrent state from it as usual.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from ..model.falcon_h1 import FalconH1Attention, FalconH1ForCausalLM, FalconH1MLP
from ..model.h1_config import FalconH1Config
from .h1_mixer import ParallelH1Mixer, SsmShare, ssm_rank_fields, ssm_share
from .layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    Shard,
    VocabParallelEmbedding,
    VocabParallelHead,
    vocab_sizes,
)
from .partition import Partition, partition
from .state import ParallelState


@dataclass(frozen=True)
class AttentionShare:
    """One rank's query heads and KV heads (contiguous ranges of the full model's)."""

    query: Partition
    kv: Partition


def attention_share(num_heads: int, num_kv_heads: int, state: ParallelState) -> AttentionShare:
    """This rank's query and KV heads (see the module docstring); ValueError when a rank would get no query head."""
    world, rank = state.world_size, state.rank
    per_kv = num_heads // num_kv_heads
    if num_kv_heads >= world:
        kv = partition(num_kv_heads, world, rank)
        return AttentionShare(Partition(kv.start * per_kv, kv.stop * per_kv, num_heads), kv)
    for g in range(num_kv_heads):  # KV head g is held by the ranks in ``block``; they split its query heads
        block = partition(world, num_kv_heads, g)
        if per_kv < block.size:
            raise ValueError(
                f"num_attention_heads ({num_heads}) over num_key_value_heads ({num_kv_heads}) gives {per_kv} "
                f"query heads per KV head, fewer than the {block.size} ranks sharing one KV head at tensor-parallel "
                f"size {world}: every rank needs one query head"
            )
        if block.start <= rank < block.stop:
            q = partition(per_kv, block.size, rank - block.start)
            return AttentionShare(
                Partition(g * per_kv + q.start, g * per_kv + q.stop, num_heads), Partition(g, g + 1, num_kv_heads)
            )
    raise AssertionError("unreachable: every rank is in one KV head's block")


def mlp_share(config: FalconH1Config, state: ParallelState) -> Partition:
    f = config.intermediate_size
    if f < state.world_size:
        raise ValueError(f"intermediate_size ({f}) must be at least the tensor-parallel size ({state.world_size})")
    return partition(f, state.world_size, state.rank)


def h1_rank_config(config: FalconH1Config, state: ParallelState) -> FalconH1Config:
    """This rank's config: its heads, KV heads, MLP width and Mamba sizes; everything else the full model's.

    Copied field by field rather than rebuilt: a rank's SSM heads need not be a multiple of the B/C groups it
    holds (``n_groups < world``), which the full config's validation rightly forbids."""
    attn = attention_share(config.num_attention_heads, config.num_key_value_heads, state)
    local = copy.copy(config)
    local.num_attention_heads = attn.query.size
    local.num_key_value_heads = attn.kv.size
    local.intermediate_size = mlp_share(config, state).size
    for name, value in ssm_rank_fields(ssm_share(config, state)).items():
        setattr(local, name, value)
    return local


def _shard_attention(attn: FalconH1Attention, config: FalconH1Config, share: AttentionShare, state: ParallelState):
    h, d, bias = config.hidden_size, config.head_dim, config.attention_bias
    kv_rows = Shard.of(share.kv, 0, d)
    attn.q_proj = ColumnParallelLinear(h, Shard.of(share.query, 0, d), bias, state)
    attn.k_proj = ColumnParallelLinear(h, kv_rows, bias, state)
    attn.v_proj = ColumnParallelLinear(h, kv_rows, bias, state)
    attn.o_proj = RowParallelLinear(Shard.of(share.query, 1, d), h, bias, state)


def _shard_mlp(mlp: FalconH1MLP, config: FalconH1Config, share: Partition, state: ParallelState) -> None:
    h, bias = config.hidden_size, config.mlp_bias
    mlp.gate_proj = ColumnParallelLinear(h, Shard.of(share, 0), bias, state)
    mlp.up_proj = ColumnParallelLinear(h, Shard.of(share, 0), bias, state)
    mlp.down_proj = RowParallelLinear(Shard.of(share, 1), h, bias, state)


def build_h1_rank_model(config: FalconH1Config, state: ParallelState) -> FalconH1ForCausalLM:
    """This rank's Falcon-H1 (parameters uninitialised: build it under ``torch.device("meta")`` and load the
    shards, or fill it from a full model). Its ``config`` is the per-rank one; parameter names are the full
    model's."""
    rank_config = h1_rank_config(config, state)
    attn = attention_share(config.num_attention_heads, config.num_key_value_heads, state)
    ssm: SsmShare = ssm_share(config, state)
    mlp = mlp_share(config, state)
    model = FalconH1ForCausalLM(rank_config)
    for i, layer in enumerate(model.model.layers):
        layer.mamba = ParallelH1Mixer(config, rank_config, i, ssm, state)
        _shard_attention(layer.self_attn, config, attn, state)
        _shard_mlp(layer.feed_forward, config, mlp, state)
    vocab = partition(config.vocab_size, state.world_size, state.rank)
    model.model.embed_tokens = VocabParallelEmbedding(vocab, config.hidden_size, state)
    model.lm_head = VocabParallelHead(config.hidden_size, vocab, state, vocab_sizes(config.vocab_size, state))
    model.tie_weights()
    return model
