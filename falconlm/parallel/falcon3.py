"""Falcon3 (the Llama layout) as one tensor-parallel rank's shard.

Q, K and V are column-parallel over the rank's heads (whole KV groups, or, with fewer KV heads than ranks, its
query heads and its group's K/V head replicated; ``heads.py``), ``o_proj`` row-parallel over the same query
heads; gate and up column-parallel, down row-parallel over the same features. RMSNorms replicated, RoPE
unchanged, embedding and head vocabulary-parallel (a tied head shares the embedding's slice).
"""

from __future__ import annotations

import dataclasses

import torch

from ..model.checkpoint import _SkipInit
from ..model.falcon3 import Falcon3ForCausalLM
from ..model.falcon3_config import Falcon3Config
from .falcon import VOCAB_ROWS, ColumnMultiple, no_constraint
from .heads import split_features, split_heads
from .layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    Shard,
    VocabParallelEmbedding,
    VocabParallelHead,
    vocab_partition,
    vocab_sizes,
)
from .state import ParallelState


def build_falcon3_shard(
    config: Falcon3Config, state: ParallelState, multiple: ColumnMultiple = no_constraint
) -> Falcon3ForCausalLM:
    """This rank's Falcon3 on the meta device (see :func:`falconlm.parallel.falcon.build_falcon_shard`)."""
    d, h = config.head_dim, config.hidden_size
    heads = split_heads(
        config.num_attention_heads, config.num_key_value_heads, d, state.world_size, state.rank,
        multiple("self_attn.o_proj"), "self_attn.o_proj",
    )  # fmt: skip
    ffn = config.intermediate_size
    f0, f1 = split_features(ffn, state.world_size, state.rank, multiple("mlp.down_proj"), "mlp.down_proj")
    cfg = dataclasses.replace(
        config, num_attention_heads=heads.local_heads, num_key_value_heads=heads.local_groups, head_dim=d,
        intermediate_size=f1 - f0,
    )  # fmt: skip
    vocab = vocab_partition(config.vocab_size, state, multiple=VOCAB_ROWS)
    a_bias, m_bias = config.attention_bias, config.mlp_bias
    features = Shard(0, ((f0, f1),), ffn)
    with torch.device("meta"), _SkipInit():
        model = Falcon3ForCausalLM(cfg)
        model.model.embed_tokens = VocabParallelEmbedding(vocab, h, state)
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.q_proj = ColumnParallelLinear(h, heads.query_rows(d), a_bias, state)
            attn.k_proj = ColumnParallelLinear(h, heads.kv_rows(d), a_bias, state)
            attn.v_proj = ColumnParallelLinear(h, heads.kv_rows(d), a_bias, state)
            attn.o_proj = RowParallelLinear(heads.output_columns(d), h, a_bias, state)
            mlp.gate_proj = ColumnParallelLinear(h, features, m_bias, state)
            mlp.up_proj = ColumnParallelLinear(h, features, m_bias, state)
            mlp.down_proj = RowParallelLinear(Shard(1, features.ranges, ffn), h, m_bias, state)
        model.lm_head = VocabParallelHead(h, vocab, state, vocab_sizes(config.vocab_size, state, VOCAB_ROWS))
        model.tie_weights()
    return model
