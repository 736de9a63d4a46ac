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
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionContext
from .config import FalconConfig
from .dense import KVCache, dense_inputs
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

    def forward(self, x: torch.Tensor, rope: Rope, ctx: AttentionContext) -> torch.Tensor:
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
        return self.dense(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


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

    def forward(self, x: torch.Tensor, rope: Rope, ctx: AttentionContext) -> torch.Tensor:
        """Sequential: ``x + Attn(LN(x))`` then ``+ MLP(LN(.))``. Parallel (the Falcon paper's block):
        ``x + Attn(LN_attn(x)) + MLP(LN_mlp(x))``, where one shared LayerNorm may serve both."""
        if not self.parallel:  # falcon-rw
            x = x + self._drop(self.self_attention(self.input_layernorm(x), rope, ctx), self.attention_dropout)
            return x + self._drop(self.mlp(self.post_attention_layernorm(x)), self.hidden_dropout)
        if hasattr(self, "ln_attn"):  # falcon-40b / 180b
            attn_in, mlp_in = self.ln_attn(x), self.ln_mlp(x)
        else:  # falcon-7b, Falcon2-11B
            attn_in = mlp_in = self.input_layernorm(x)
        attn = self.self_attention(attn_in, rope, ctx)
        return self._drop(self.mlp(mlp_in) + attn, self.hidden_dropout) + x

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
    ) -> torch.Tensor:
        """Hidden states [B, T, H] after ``ln_f`` for tokens ``input_ids`` at ``positions`` (both [B, T]).

        ``attention`` decides where each layer's K/V go and what each query sees (``dense.py``, the engine's
        paged context); rotary models rotate by ``positions``, ALiBi ones take their bias from the context.
        ``rope_lengths`` [B, T]: per-token sequence lengths for dynamic RoPE scaling (``positions.rope_cos_sin``).
        """
        x = self.word_embeddings(input_ids)  # [B, T, H]
        rope = rope_cos_sin(self.config, positions, x.dtype, rope_lengths) if self.config.rotary else None
        for block in self.h:
            x = block(x, rope, attention)
        return self.ln_f(x)


class FalconForCausalLM(nn.Module):
    """Falcon with its language-model head (tied to the embedding unless ``tie_word_embeddings`` is false)."""

    def __init__(self, config: FalconConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = FalconModel(config)
        self.lm_head = FalconLinear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.word_embeddings.weight

    @property
    def final_norm(self) -> nn.LayerNorm:
        """The last norm: its weight gives the activations' dtype and device (cheap on quantized models)."""
        return self.transformer.ln_f

    def get_input_embeddings(self) -> nn.Module:
        return self.transformer.word_embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        last_token_only: bool = False,
    ) -> torch.Tensor:
        """The HF-style call: logits [B, T, vocab] (or [B, 1, vocab] with ``last_token_only``).

        ``attention_mask`` [B, past + T] marks real tokens with 1 and left padding with 0; ``kv_cache`` is read
        and extended by T positions. A thin wrapper over :meth:`forward_hidden` and :meth:`compute_logits` with
        a dense attention context (``dense.py``).
        """
        dropout_p = self.config.attention_dropout if (self.training and self.config.alibi) else 0.0
        dtype = self.transformer.ln_f.weight.dtype  # the activations' (cheap on quantized models)
        positions, attention = dense_inputs(
            self.config, input_ids, attention_mask, position_ids, kv_cache, dtype, dropout_p
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
        """Hidden states [B, T, H] after ``ln_f`` (see :meth:`FalconModel.forward`)."""
        return self.transformer(input_ids, positions, attention, rope_lengths)

    def compute_logits(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``hidden`` [..., H]: all of them, or with ``rows`` only those token rows of the flattened
        [B * T, H] states (e.g. each sequence's last), as [R, vocab]."""
        if rows is not None:
            hidden = hidden.reshape(-1, hidden.shape[-1])[rows]
        return self.lm_head(hidden)

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A cache sized for ``batch_size`` rows of up to ``max_len`` positions, in the model's dtype and device."""
        p = self.transformer.ln_f.weight  # dtype and device (a quantized head would rebuild its matrix)
        return KVCache(self.config, batch_size, max_len, p.dtype, p.device)

    def init_weights(self, seed: int | None = None) -> None:
        """Random initialisation for training from scratch: N(0, initializer_range), LayerNorms at identity."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                w = torch.empty(module.weight.shape).normal_(0.0, std, generator=gen)
                module.weight.data.copy_(w)
                if getattr(module, "bias", None) is not None:
                    module.bias.data.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.data.fill_(1.0)
                module.bias.data.zero_()

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
    ) -> FalconForCausalLM:
        """Load any Falcon-family checkpoint folder (its family read from config.json, ``families.py``; a Falcon3
        folder gives a ``Falcon3ForCausalLM``) straight into ``dtype`` on ``device``: a plain Hugging Face one
        (shard by shard), one written by ``falconlm quantize``, or a hub GPTQ one (``formats.py``).

        ``quantize`` (``"int8"``, ``"int4"``, ``"int4-g128"``... or a ``falconlm.quant.QuantRecipe``) quantizes a
        plain folder on load.
        """
        from .formats import load_pretrained

        return load_pretrained(path, dtype, device, quantize)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int | None = None) -> None:
        """Write config.json and safetensors weights (sharded above ``max_shard_bytes``)."""
        from .checkpoint import save_model

        save_model(self, path, max_shard_bytes=max_shard_bytes)
