"""The Falcon decoder (TII, "The Falcon Series of Open Language Models", 2023), one variant per config.

Module and parameter names equal transformers' ``FalconForCausalLM`` so that a Hugging Face checkpoint loads by
name. Block shapes (falcon-spec §3.1):

* falcon-rw: sequential, ``x + attn(ln1(x))`` then ``+ mlp(ln2(.))``, with biases and ALiBi;
* falcon-7b: parallel, one shared LayerNorm, multi-query attention;
* falcon-40b/180b: parallel, ``ln_attn`` and ``ln_mlp``, grouped-query attention;
* Falcon2-11B: parallel, one shared LayerNorm, grouped-query attention, untied head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionContext
from .causal_lm import KVCausalLM, token_rows
from .config import FalconConfig
from .positions import apply_rope, rope_cos_sin

Rope = tuple[torch.Tensor, torch.Tensor] | None


class FalconLinear(nn.Linear):
    """A Linear whose bias is added after the matmul as a separate op, as Falcon was trained (falcon-spec §3.4).

    The matmul is ``F.linear`` unless a kernel was bound to this weight at load (``matmul(x, weight)``; the engine
    binds the native bfloat16 one on CPU, ``falconlm.engine.kernels``)."""

    matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight) if self.matmul is None else self.matmul(x, self.weight)
        return y if self.bias is None else y + self.bias


class FalconAttention(nn.Module):
    """Fused QKV projection, rotary positions, attention over the KV groups, output projection."""

    def __init__(self, config: FalconConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_groups = config.num_kv_groups
        self.queries_per_kv = config.queries_per_kv
        self.head_dim = config.head_dim
        self.query_key_value = FalconLinear(config.hidden_size, config.qkv_out_features, bias=config.bias)
        self.dense = FalconLinear(config.hidden_size, config.hidden_size, bias=config.bias)

    def forward(
        self, x: torch.Tensor, rope: Rope, ctx: AttentionContext, out_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Every token's K/V into ``ctx``; the output [B, T, H], or with ``out_rows`` that of those rows only."""
        B, T, _ = x.shape
        # Rows of the fused weight: G groups of [queries_per_kv query heads, 1 key, 1 value] (falcon-spec §2).
        qkv = self.query_key_value(x).view(B, T, self.num_kv_groups, self.queries_per_kv + 2, self.head_dim)
        qk = qkv[:, :, :, :-1]  # each group's query heads and its key, side by side
        if rope is not None:
            qk = apply_rope(qk, *rope)  # one rotation turns them all
        q = qk[:, :, :, :-1].reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # [B, Hq, T, d]
        k = qk[:, :, :, -1].transpose(1, 2)  # [B, G, T, d]
        v = qkv[:, :, :, -1].transpose(1, 2)  # [B, G, T, d]
        out = ctx.attend(self.layer_idx, q, k, v)  # [B, Hq, T, d]
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.dense(token_rows(out, out_rows))


class FalconMLP(nn.Module):
    """h -> ffn_hidden_size -> h with the exact (erf) GELU."""

    def __init__(self, config: FalconConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = FalconLinear(config.hidden_size, config.ffn_hidden_size, bias=config.bias)
        self.dense_4h_to_h = FalconLinear(config.ffn_hidden_size, config.hidden_size, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class FalconBlock(nn.Module):
    """One decoder layer; the LayerNorms it owns decide its shape (``config.layer_norms``)."""

    def __init__(self, config: FalconConfig, layer_idx: int) -> None:
        super().__init__()
        for name in config.layer_norms:
            self.add_module(name, nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon))
        self.parallel = config.parallel_attn
        self.self_attention = FalconAttention(config, layer_idx)
        self.mlp = FalconMLP(config)
        self.hidden_dropout = config.hidden_dropout
        self.attention_dropout = config.attention_dropout

    def forward(
        self, x: torch.Tensor, rope: Rope, ctx: AttentionContext, out_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Sequential: ``x + Attn(LN(x))`` then ``+ MLP(LN(.))``. Parallel (the Falcon paper's block):
        ``x + Attn(LN_attn(x)) + MLP(LN_mlp(x))``, where one shared LayerNorm may serve both.
        ``out_rows``: the output of those token rows only ([1, R, H]); every token still stores its K/V."""
        if not self.parallel:  # falcon-rw
            attn = self.self_attention(self.input_layernorm(x), rope, ctx, out_rows)
            x = token_rows(x, out_rows) + self._drop(attn, self.attention_dropout)
            return x + self._drop(self.mlp(self.post_attention_layernorm(x)), self.hidden_dropout)
        if hasattr(self, "ln_attn"):  # falcon-40b / 180b
            attn_in, mlp_in = self.ln_attn(x), self.ln_mlp(x)
        else:  # falcon-7b, Falcon2-11B
            attn_in = mlp_in = self.input_layernorm(x)
        attn = self.self_attention(attn_in, rope, ctx, out_rows)
        return self._drop(self.mlp(token_rows(mlp_in, out_rows)) + attn, self.hidden_dropout) + token_rows(x, out_rows)

    def _drop(self, x: torch.Tensor, p: float) -> torch.Tensor:
        return F.dropout(x, p, training=True) if self.training and p > 0 else x


class FalconModel(nn.Module):
    """Embedding, the blocks, the final LayerNorm."""

    def __init__(self, config: FalconConfig) -> None:
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(FalconBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attention: AttentionContext,
        rope_lengths: torch.Tensor | None = None,
        out_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [B, T, H] after ``ln_f`` for tokens ``input_ids`` at ``positions`` (both [B, T]); with
        ``out_rows`` (flat token indices) only those rows' states, [1, R, H]: the last block runs the other rows
        only as far as their K/V.

        ``attention`` decides where each layer's K/V go and what each query sees (``dense.py``, the engine's
        paged context); rotary models rotate by ``positions``, ALiBi ones take their bias from the context.
        ``rope_lengths`` [B, T]: per-token sequence lengths for dynamic RoPE scaling (``positions.rope_cos_sin``).
        """
        x = self.word_embeddings(input_ids)  # [B, T, H]
        rope = rope_cos_sin(self.config, positions, x.dtype, rope_lengths) if self.config.rotary else None
        *blocks, last = self.h
        for block in blocks:
            x = block(x, rope, attention)
        return self.ln_f(last(x, rope, attention, out_rows))


class FalconForCausalLM(KVCausalLM):
    """Falcon with its language-model head (tied to the embedding unless ``tie_word_embeddings`` is false).

    ``from_pretrained`` reads any Falcon-family folder and returns that family's model (a Falcon3 folder gives a
    ``Falcon3ForCausalLM``); the rest of the interface is :class:`~falconlm.model.causal_lm.KVCausalLM`'s."""

    decoder_name, embeddings_name, final_norm_name = "transformer", "word_embeddings", "ln_f"
    family_label = "Falcon"
    loads_any_family = True

    def __init__(self, config: FalconConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = FalconModel(config)
        self.lm_head = FalconLinear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def _attention_dropout(self) -> float:
        """falcon-rw (ALiBi) trains with dropout on the attention probabilities."""
        return self.config.attention_dropout if (self.training and self.config.alibi) else 0.0
