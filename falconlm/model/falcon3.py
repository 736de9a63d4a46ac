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

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionContext
from .dense import KVCache, dense_inputs
from .falcon import FalconLinear
from .falcon3_config import Falcon3Config
from .positions import apply_rope, rope_cos_sin

Rope = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, computed in float32 and cast back before the weight (as Llama)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


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

    def forward(self, x: torch.Tensor, rope: Rope, ctx: AttentionContext) -> torch.Tensor:
        B, T, _ = x.shape
        cos, sin = rope  # [B, T, 1, d]: the same angles for every head
        q = apply_rope(self.q_proj(x).view(B, T, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        # Query head h reads KV head h // (Hq / G): the grouping of both Llama and SDPA's enable_gqa.
        out = ctx.attend(self.layer_idx, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, Hq, T, d]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


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

    def forward(self, x: torch.Tensor, rope: Rope, ctx: AttentionContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, ctx)
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
    ) -> torch.Tensor:
        """Hidden states [B, T, H] after the final norm for ``input_ids`` at ``positions`` (both [B, T]);
        ``rope_lengths`` [B, T]: per-token sequence lengths for dynamic RoPE scaling, as in ``falcon.py``."""
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.config, positions, x.dtype, rope_lengths)  # [B, T, 1, 1, d]
        rope = (cos[:, :, 0], sin[:, :, 0])  # [B, T, 1, d]
        for layer in self.layers:
            x = layer(x, rope, attention)
        return self.norm(x)


class Falcon3ForCausalLM(nn.Module):
    """Falcon3 with its language-model head (untied unless ``tie_word_embeddings``)."""

    def __init__(self, config: Falcon3Config) -> None:
        super().__init__()
        self.config = config
        self.model = Falcon3Model(config)
        self.lm_head = FalconLinear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def final_norm(self) -> RMSNorm:
        """The last norm: its weight gives the activations' dtype and device (cheap on quantized models)."""
        return self.model.norm

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        last_token_only: bool = False,
    ) -> torch.Tensor:
        """The HF-style call: logits [B, T, vocab] (or [B, 1, vocab] with ``last_token_only``); see
        :meth:`falconlm.model.falcon.FalconForCausalLM.forward` for the arguments."""
        positions, attention = dense_inputs(
            self.config, input_ids, attention_mask, position_ids, kv_cache, self.final_norm.weight.dtype
        )
        hidden = self.forward_hidden(input_ids, positions, attention)
        if kv_cache is not None:
            kv_cache.length += input_ids.shape[1]
        return self.compute_logits(hidden[:, -1:] if last_token_only else hidden)

    def forward_hidden(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attention: AttentionContext,
        rope_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [B, T, H] after the final norm (see :meth:`Falcon3Model.forward`)."""
        return self.model(input_ids, positions, attention, rope_lengths)

    def compute_logits(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``hidden`` [..., H], or with ``rows`` of those rows of the flattened [B * T, H] states."""
        if rows is not None:
            hidden = hidden.reshape(-1, hidden.shape[-1])[rows]
        return self.lm_head(hidden)

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A cache sized for ``batch_size`` rows of up to ``max_len`` positions, in the model's dtype and device."""
        p = self.final_norm.weight
        return KVCache(self.config, batch_size, max_len, p.dtype, p.device)

    def num_parameters(self) -> int:
        """Parameters counted once (a tied head is not counted twice)."""
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        quantize: str | None = None,
    ) -> Falcon3ForCausalLM:
        """Load a Falcon3 checkpoint folder (plain, falconlm-quantized, or quantized on load with ``quantize``)."""
        from .formats import load_pretrained

        model = load_pretrained(path, dtype, device, quantize)
        if not isinstance(model, cls):
            raise ValueError(f"{path} holds a {type(model).__name__} checkpoint, not a Falcon3 one")
        return model

    def save_pretrained(self, path: str | Path, max_shard_bytes: int | None = None) -> None:
        """Write config.json and safetensors weights (sharded above ``max_shard_bytes``)."""
        from .checkpoint import save_model

        save_model(self, path, max_shard_bytes=max_shard_bytes)
