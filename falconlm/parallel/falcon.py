"""Falcon (falcon-rw, 7B, 40B/180B, Falcon2-11B) as one tensor-parallel rank's shard.

The rank builds Falcon's own classes from a :class:`FalconRankConfig` (its query heads, KV groups and MLP
features) and swaps in the parallel layers:

* fused QKV: column-parallel over the rank's rows (whole groups, or its query heads plus the shared group's
  K/V, replicated; ``heads.py``); ``dense``: row-parallel over the same query heads' columns;
* MLP in: column-parallel, MLP out: row-parallel over the same features;
* LayerNorms replicated; embedding and head vocabulary-parallel (a tied head shares the embedding's slice);
* parallel blocks (7B, 40B, 11B) add attention and MLP before one all-reduce, then both biases once.

ALiBi (falcon-rw) slopes depend on the global head index: the rank config says which heads it holds
(``alibi_heads``), and the dense and paged attention paths take their slopes from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..model.attention import AttentionContext
from ..model.causal_lm import token_rows
from ..model.checkpoint import _SkipInit
from ..model.config import FalconConfig
from ..model.falcon import FalconBlock, FalconForCausalLM, Rope
from ..quant.kernels.native import TILE
from .heads import HeadSplit, split_features, split_heads
from .layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    Shard,
    VocabParallelEmbedding,
    VocabParallelHead,
    finish_rows,
    vocab_partition,
    vocab_sizes,
)
from .state import ParallelState

VOCAB_ROWS = TILE  # vocabulary slices on the native quantized kernels' row tiles where they can be
ColumnMultiple = Callable[[str], int]  # a row-parallel matrix kind -> where its input may be split (columns)


@dataclass
class FalconRankConfig(FalconConfig):
    """One rank's share of a :class:`FalconConfig`: ``num_attention_heads``, its KV groups (``num_kv_heads``
    for the grouped-query layout) and ``ffn_hidden_size`` are the rank's; ``head_dim`` and the ALiBi slopes stay
    the full model's."""

    full_head_dim: int = 0
    head_offset: int = 0  # the global index of the rank's first query head
    total_heads: int = 0  # the full model's query heads

    @property
    def head_dim(self) -> int:
        return self.full_head_dim

    @property
    def alibi_heads(self) -> tuple[int, int]:
        return self.head_offset, self.total_heads

    def _validate(self) -> None:
        """The full config was validated when read; a rank's head count need not divide ``hidden_size``."""


class ParallelFalconBlock(FalconBlock):
    """A Falcon block whose parallel form (attention and MLP side by side) all-reduces their sum once."""

    def forward(
        self, x: torch.Tensor, rope: Rope, ctx: AttentionContext, out_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not self.parallel:
            return super().forward(x, rope, ctx, out_rows)
        if hasattr(self, "ln_attn"):
            attn_in, mlp_in = self.ln_attn(x), self.ln_mlp(x)
        else:
            attn_in = mlp_in = self.input_layernorm(x)
        attn = self.self_attention(attn_in, rope, ctx, out_rows)  # partial products: dense, dense_4h_to_h do not reduce
        mlp = self.mlp(token_rows(mlp_in, out_rows))
        out = finish_rows(mlp + attn, self.mlp.dense_4h_to_h, self.self_attention.dense)
        return self._drop(out, self.hidden_dropout) + token_rows(x, out_rows)


def no_constraint(kind: str) -> int:
    return 1


@dataclass(frozen=True)
class FalconSplit:
    """A rank's heads and its MLP features ``[ffn_start, ffn_stop)``."""

    heads: HeadSplit
    ffn_start: int
    ffn_stop: int


def split_falcon(config: FalconConfig, state: ParallelState, multiple: ColumnMultiple = no_constraint) -> FalconSplit:
    """The rank's heads and features (see :mod:`falconlm.parallel.heads`)."""
    heads = split_heads(
        config.num_attention_heads, config.num_kv_groups, config.head_dim, state.world_size, state.rank,
        multiple("self_attention.dense"), "self_attention.dense",
    )  # fmt: skip
    f0, f1 = split_features(
        config.ffn_hidden_size, state.world_size, state.rank, multiple("mlp.dense_4h_to_h"), "mlp.dense_4h_to_h"
    )
    return FalconSplit(heads, f0, f1)


def rank_config(config: FalconConfig, split: FalconSplit) -> FalconRankConfig:
    """The rank's share of ``config``."""
    heads = split.heads
    kv = heads.local_groups if config.new_decoder_architecture else heads.local_heads
    ffn = split.ffn_stop - split.ffn_start
    base = {f.name: getattr(config, f.name) for f in dataclasses.fields(FalconConfig)}
    return FalconRankConfig(
        **base | {"num_attention_heads": heads.local_heads, "num_kv_heads": kv, "ffn_hidden_size": ffn},
        full_head_dim=config.head_dim,
        head_offset=heads.head_start,
        total_heads=config.num_attention_heads,
    )


def build_falcon_shard(
    config: FalconConfig, state: ParallelState, multiple: ColumnMultiple = no_constraint
) -> FalconForCausalLM:
    """This rank's Falcon on the meta device, parameters named as in the full model, each recording its slice
    (``tp_shards``); ``multiple(kind)`` is where a row-parallel matrix's input may be split (int4 groups)."""
    d, h, bias = config.head_dim, config.hidden_size, config.bias
    split = split_falcon(config, state, multiple)
    heads, f0, f1 = split.heads, split.ffn_start, split.ffn_stop
    ffn = config.ffn_hidden_size
    cfg = rank_config(config, split)
    reduce = not config.parallel_attn  # parallel blocks reduce attention + MLP once (ParallelFalconBlock)
    vocab = vocab_partition(config.vocab_size, state, multiple=VOCAB_ROWS)
    with torch.device("meta"), _SkipInit():
        model = FalconForCausalLM(cfg)
        model.transformer.word_embeddings = VocabParallelEmbedding(vocab, h, state)
        for i in range(config.num_hidden_layers):
            block = ParallelFalconBlock(cfg, i)
            attn, mlp = block.self_attention, block.mlp
            attn.query_key_value = ColumnParallelLinear(h, heads.fused_qkv_rows(d), bias, state)
            attn.dense = RowParallelLinear(heads.output_columns(d), h, bias, state, reduce)
            mlp.dense_h_to_4h = ColumnParallelLinear(h, Shard(0, ((f0, f1),), ffn), bias, state)
            mlp.dense_4h_to_h = RowParallelLinear(Shard(1, ((f0, f1),), ffn), h, bias, state, reduce)
            model.transformer.h[i] = block
        model.lm_head = VocabParallelHead(h, vocab, state, vocab_sizes(config.vocab_size, state, VOCAB_ROWS))
        model.tie_weights()
    return model
