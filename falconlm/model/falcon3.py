"""The Falcon3 decoder: the Llama layout (TII, "Falcon3", December 2024; Touvron et al. 2023 for the layout).

Module and parameter names equal transformers' ``LlamaForCausalLM`` so that a Falcon3 checkpoint loads by name.
One block is sequential and pre-norm::

    x = x + o_proj(attend(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1)))   with n1 = RMSNorm(x)
    x = x + down_proj(silu(gate_proj(n2)) * up_proj(n2))                        with n2 = RMSNorm(x)

It shares with ``falcon.py`` what really is the same: rotary angles (``positions.py``), the attention seam that
keeps only the KV heads in a dense or paged cache (``attention.py``), the dense HF-style call (``dense.py``) and
the bias-after-matmul Linear the engine binds its native matmul to. The forward interface is FalconForCausalLM's
(``forward_hidden`` / ``compute_logits``), so the engine runs it unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionContext
from .causal_lm import KVCausalLM, token_rows
from .falcon import FalconLinear
from .falcon3_config import Falcon3Config
from .norms import RMSNorm
from .positions import apply_rope, rope_cos_sin

Rope = tuple[torch.Tensor, torch.Tensor]


class Falcon3Attention(nn.Module):
    """Separate Q, K, V projections, rotary positions, attention over the KV heads, output projection."""

    def __init__(self, config: Falcon3Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = FalconLinear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = FalconLinear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = FalconLinear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = FalconLinear(self.num_heads * self.head_dim, h, bias=bias)

    def forward(
        self, x: torch.Tensor, rope: Rope, ctx: AttentionContext, out_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Every token's K/V into ``ctx``; the output [B, T, H], or with ``out_rows`` that of those rows only."""
        B, T, _ = x.shape
        cos, sin = rope  # [B, T, 1, d]: the same angles for every head
        q = apply_rope(self.q_proj(x).view(B, T, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        # Query head h reads KV head h // (Hq / G): the grouping of both Llama and SDPA's enable_gqa.
        out = ctx.attend(self.layer_idx, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, Hq, T, d]
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(token_rows(out, out_rows))


class Falcon3MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: Falcon3Config) -> None:
        super().__init__()
        h, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = FalconLinear(h, f, bias=bias)
        self.up_proj = FalconLinear(h, f, bias=bias)
        self.down_proj = FalconLinear(f, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Falcon3Block(nn.Module):
    """One decoder layer: attention then MLP, each after its RMSNorm and added to the residual stream."""

    def __init__(self, config: Falcon3Config, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Falcon3Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Falcon3MLP(config)

    def forward(
        self, x: torch.Tensor, rope: Rope, ctx: AttentionContext, out_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``out_rows``: the output of those token rows only ([1, R, H]); every token still stores its K/V."""
        x = token_rows(x, out_rows) + self.self_attn(self.input_layernorm(x), rope, ctx, out_rows)
        return x + self.mlp(self.post_attention_layernorm(x))


class Falcon3Model(nn.Module):
    """Embedding, the blocks, the final RMSNorm."""

    def __init__(self, config: Falcon3Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Falcon3Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attention: AttentionContext,
        rope_lengths: torch.Tensor | None = None,
        out_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [B, T, H] after the final norm for ``input_ids`` at ``positions`` (both [B, T]);
        ``rope_lengths`` [B, T]: per-token sequence lengths for dynamic RoPE scaling, as in ``falcon.py``;
        ``out_rows``: those token rows' only, [1, R, H] (``falcon.py``)."""
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.config, positions, x.dtype, rope_lengths)  # [B, T, 1, 1, d]
        rope = (cos[:, :, 0], sin[:, :, 0])  # [B, T, 1, d]
        *layers, last = self.layers
        for layer in layers:
            x = layer(x, rope, attention)
        return self.norm(last(x, rope, attention, out_rows))


class Falcon3ForCausalLM(KVCausalLM):
    """Falcon3 with its language-model head (untied unless ``tie_word_embeddings``)."""

    decoder_name, embeddings_name, final_norm_name = "model", "embed_tokens", "norm"
    family_label = "Falcon3"

    def __init__(self, config: Falcon3Config) -> None:
        super().__init__()
        self.config = config
        self.model = Falcon3Model(config)
        self.lm_head = FalconLinear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
