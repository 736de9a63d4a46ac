"""Falcon-H1 (TII, "Falcon-H1: A Family of Hybrid-Head Language Models", 2025): attention and Mamba-2 in parallel.

Module and parameter names equal transformers' ``FalconH1ForCausalLM`` so that a Hugging Face checkpoint loads by
name. One layer::

    h = RMSNorm(x)
    x = x + ssm_out · Mamba2(ssm_in · h) + attn_out · Attention(attn_in · h)      (keys scaled by key_multiplier)
    x = x + down · W_down(W_up(RMSNorm(x)) · silu(gate · W_gate(RMSNorm(x))))

with the embedding scaled by ``embedding_multiplier`` and the logits by ``lm_head_multiplier``; the Mamba
``in_proj`` outputs (z, x, B, C, Δ) are each scaled by one of ``ssm_multipliers`` (transformers' ``mup_vector``).
Attention goes through the shared attention seam (``attention.py``: dense or paged KV cache, grouped K/V never
broadcast); the Mamba mixer's per-sequence conv and SSM state go through the recurrent seam (``recurrent.py``),
its scan through ``ssd_scan.py`` (chunked for prompts, one step for decodes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionContext
from .causal_lm import CausalLM
from .dense import KVCache, dense_inputs
from .falcon import FalconLinear
from .h1_config import FalconH1Config
from .norms import RMSNorm
from .positions import rope_cos_sin, rotate_half
from .recurrent import RecurrentBatch, RecurrentState, causal_conv
from .ssd_scan import ssd_chunked, ssd_step

Rope = tuple[torch.Tensor, torch.Tensor]


class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm: RMSNorm over each group of channels, gated by ``silu(z)`` before or after."""

    def __init__(self, size: int, eps: float, groups: int, norm_before_gate: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.groups = groups
        self.norm_before_gate = norm_before_gate

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        y = y.float()
        if not self.norm_before_gate:
            y = y * F.silu(z.float())
        grouped = y.view(*y.shape[:-1], self.groups, -1)
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        y = (self.weight.view(self.groups, -1) * grouped).view(y.shape)
        if self.norm_before_gate:
            y = y * F.silu(z.float())
        return y.to(dtype)


class FalconH1Attention(nn.Module):
    """Grouped-query attention with separate q/k/v projections, keys scaled by ``key_multiplier``, RoPE."""

    def __init__(self, config: FalconH1Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.key_multiplier = config.key_multiplier
        h, q, kv, bias = (
            config.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            config.attention_bias,
        )
        self.q_proj = FalconLinear(h, q, bias=bias)
        self.k_proj = FalconLinear(h, kv, bias=bias)
        self.v_proj = FalconLinear(h, kv, bias=bias)
        self.o_proj = FalconLinear(q, h, bias=bias)

    def forward(self, x: torch.Tensor, rope: Rope, ctx: AttentionContext) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim) * self.key_multiplier
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        cos, sin = rope  # [B, T, 1, d]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = ctx.attend(self.layer_idx, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, Hq, T, d]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class FalconH1Mixer(nn.Module):
    """The Mamba-2 mixer: in_proj -> (z, xBC, Δ); causal depthwise conv + silu on xBC; the SSD scan over x with
    B, C, Δ; gate by z (optionally through a grouped RMSNorm); out_proj."""

    def __init__(self, config: FalconH1Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.d_ssm = config.mamba_d_ssm
        self.num_heads = config.mamba_n_heads
        self.head_dim = config.mamba_d_head
        self.num_groups = config.mamba_n_groups
        self.d_state = config.mamba_d_state
        self.conv_width = config.mamba_d_conv
        self.chunk_size = config.mamba_chunk_size
        self.conv_dim = config.conv_dim
        self.in_multiplier = config.ssm_in_multiplier
        self.part_multipliers = config.ssm_multipliers  # z, x, B, C, Δ
        self.in_proj = FalconLinear(config.hidden_size, config.in_proj_features, bias=config.mamba_proj_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, config.mamba_d_conv, groups=self.conv_dim, bias=config.mamba_conv_bias,
            padding=config.mamba_d_conv - 1,
        )  # fmt: skip
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.num_heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        if config.mamba_rms_norm:
            self.norm = GatedRMSNorm(self.d_ssm, config.rms_norm_eps, self.num_groups, config.mamba_norm_before_gate)
        self.out_proj = FalconLinear(self.d_ssm, config.hidden_size, bias=config.projectors_bias)

    def forward(self, x: torch.Tensor, rows: RecurrentBatch) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        flat = x.reshape(-1, shape[-1])  # [N, hidden]: every row's tokens, in the order ``rows`` describes
        mask = None if rows.token_mask is None else rows.token_mask.to(dtype)[:, None]
        if mask is not None:
            flat = flat * mask
        projected = self.in_proj(flat * self.in_multiplier if self.in_multiplier != 1.0 else flat)
        groups_state = self.num_groups * self.d_state
        parts = list(projected.split([self.d_ssm, self.d_ssm, groups_state, groups_state, self.num_heads], dim=-1))
        parts = [p * m if m != 1.0 else p for p, m in zip(parts, self.part_multipliers, strict=True)]
        z, dt = parts[0], parts[4]
        xBC = F.silu(self._conv(torch.cat(parts[1:4], dim=-1), rows))
        if mask is not None:
            xBC = xBC * mask
        xs, B, C = xBC.split([self.d_ssm, groups_state, groups_state], dim=-1)
        dt = F.softplus(dt + self.dt_bias)
        y = self._scan(xs, dt, B, C, rows)  # [N, d_ssm] float32
        y = self.norm(y, z) if hasattr(self, "norm") else y * F.silu(z.float())
        return self.out_proj(y.to(dtype)).view(shape)

    def _conv(self, xBC: torch.Tensor, rows: RecurrentBatch) -> torch.Tensor:
        """The causal depthwise convolution of each row, continuing from (and updating) its conv state."""
        conv_states = rows.state.conv[self.layer_idx]  # [slots, K - 1, C]
        if rows.steps_only:
            return self._conv_step(xBC, conv_states, rows)
        out = torch.empty_like(xBC)
        if rows.step_rows:
            out[rows.step_positions] = self._conv_step(xBC[rows.step_positions], conv_states, rows)
        for r in rows.scan_rows:
            start, n, slot = rows.query_starts[r], rows.query_lens[r], rows.slots[r]
            past = conv_states[slot].to(xBC.dtype)
            if rows.fresh[r]:
                past = torch.zeros_like(past)
            seq = torch.cat([past, xBC[start : start + n]])  # [K - 1 + n, C]
            out[start : start + n] = causal_conv(seq, self._conv_taps(), self.conv1d.bias)
            conv_states[slot] = seq[-(self.conv_width - 1) :]
        return out

    def _conv_step(self, x: torch.Tensor, conv_states: torch.Tensor, rows: RecurrentBatch) -> torch.Tensor:
        """One new input per step row ``x`` [R, C]: a dot product with the last K inputs, summed as a prompt
        chunk's are (``causal_conv``); the state shifts."""
        past = rows.step_states(conv_states)  # [R, K - 1, C]
        window = torch.cat([past, x[:, None, :].to(conv_states.dtype)], dim=1)  # [R, K, C]
        if rows.step_block is not None:
            past.copy_(window[:, 1:])
        else:
            rows.put_step_states(conv_states, window[:, 1:])
        return causal_conv(window.to(x.dtype), self._conv_taps(), self.conv1d.bias)[:, 0]

    def _conv_taps(self) -> torch.Tensor:
        """The conv weight as [K, C], contiguous, made once per weight value (not at every step)."""
        weight = self.conv1d.weight
        key = (weight.data_ptr(), weight._version)
        if getattr(self, "_taps_key", None) != key:
            self._taps = weight.detach()[:, 0, :].T.contiguous()
            self._taps_key = key
        return self._taps

    def _scan(
        self, xs: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, rows: RecurrentBatch
    ) -> torch.Tensor:
        """The SSD scan of each row from (and into) its SSM state: y [N, d_ssm] in float32."""
        N = xs.shape[0]
        A = -torch.exp(self.A_log.float())
        xs = xs.view(N, self.num_heads, self.head_dim)
        B = B.view(N, -1, self.d_state)  # [tokens, groups, state]: each head reads its group
        C = C.view(N, -1, self.d_state)
        ssm_states = rows.state.ssm[self.layer_idx]  # [slots, H, P, N]
        if rows.steps_only:
            return self._scan_step(xs, dt, A, B, C, ssm_states, rows).view(N, self.d_ssm)
        if rows.stepwise:
            return self._scan_stepwise(xs, dt, A, B, C, ssm_states, rows).view(N, self.d_ssm)
        y = xs.new_empty(N, self.num_heads, self.head_dim, dtype=torch.float32)
        if rows.step_rows:
            p = rows.step_positions
            y[p] = self._scan_step(xs[p], dt[p], A, B[p], C[p], ssm_states, rows)
        for r in rows.scan_rows:
            start, n, slot = rows.query_starts[r], rows.query_lens[r], rows.slots[r]
            initial = None if rows.fresh[r] else ssm_states[slot][None]
            part = slice(start, start + n)
            out, final = ssd_chunked(
                xs[None, part], dt[None, part], A, B[None, part], C[None, part], self.D, self.chunk_size, initial
            )
            y[part] = out[0]
            ssm_states[slot] = final[0].to(ssm_states.dtype)
        return y.view(N, self.d_ssm)

    def _scan_stepwise(
        self,
        xs: torch.Tensor,
        dt: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        ssm_states: torch.Tensor,
        rows: RecurrentBatch,
    ) -> torch.Tensor:
        """Every token through the decode rows' one-token update (``_scan_step``), the t-th new token of every row
        together.

        The chunked form's sums depend on where a chunk starts, so a prompt cut differently by the scheduler
        would get other bits; this way a prompt token gets the bits it gets as a decode step. One update per
        position of the longest row: slower prompts, the price of deterministic mode."""
        y = xs.new_empty(xs.shape, dtype=torch.float32)
        ssm_states[[slot for slot, fresh in zip(rows.slots, rows.fresh, strict=True) if fresh]] = 0
        for t in range(max(rows.query_lens, default=0)):
            now = [r for r, n in enumerate(rows.query_lens) if n > t]
            at = torch.tensor([rows.query_starts[r] + t for r in now], device=xs.device)
            ones = [1] * len(now)  # position t of each row as a decode row of its own
            step = RecurrentBatch(
                rows.state, [rows.slots[r] for r in now], list(range(len(now))), ones, [False] * len(now)
            )
            y[at] = self._scan_step(xs[at], dt[at], A, B[at], C[at], ssm_states, step)
        return y

    def _scan_step(
        self,
        xs: torch.Tensor,
        dt: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        ssm_states: torch.Tensor,
        rows: RecurrentBatch,
    ) -> torch.Tensor:
        """The step rows' single-step recurrence: their float32 states updated where they lie when they are a
        view of consecutive slots."""
        held = rows.step_states(ssm_states)
        state = held if held.dtype is torch.float32 else held.float()
        y = ssd_step(xs, dt, A, B, C, self.D, state)
        if state is not held:
            held.copy_(state)
        rows.put_step_states(ssm_states, held)
        return y


class FalconH1MLP(nn.Module):
    """SwiGLU with µP multipliers: ``down · W_down(W_up(x) · silu(gate · W_gate(x)))``."""

    def __init__(self, config: FalconH1Config) -> None:
        super().__init__()
        h, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = FalconLinear(h, f, bias=bias)
        self.up_proj = FalconLinear(h, f, bias=bias)
        self.down_proj = FalconLinear(f, h, bias=bias)
        self.gate_multiplier, self.down_multiplier = config.mlp_multipliers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up_proj(x) * F.silu(self.gate_proj(x) * self.gate_multiplier)
        return self.down_proj(y) * self.down_multiplier


class FalconH1DecoderLayer(nn.Module):
    """Attention and Mamba-2 side by side on one normed input, then the MLP (see module docstring)."""

    def __init__(self, config: FalconH1Config, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mamba = FalconH1Mixer(config, layer_idx)
        self.self_attn = FalconH1Attention(config, layer_idx)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FalconH1MLP(config)
        self.ssm_out_multiplier = config.ssm_out_multiplier
        self.attention_in_multiplier = config.attention_in_multiplier
        self.attention_out_multiplier = config.attention_out_multiplier

    def forward(self, x: torch.Tensor, rope: Rope, attention: AttentionContext, rows: RecurrentBatch) -> torch.Tensor:
        h = self.input_layernorm(x)
        ssm = self.mamba(h, rows) * self.ssm_out_multiplier
        attn = self.self_attn(h * self.attention_in_multiplier, rope, attention) * self.attention_out_multiplier
        x = x + (ssm + attn)
        return x + self.feed_forward(self.pre_ff_layernorm(x))


class FalconH1Model(nn.Module):
    """Scaled embedding, the hybrid layers, the final RMSNorm."""

    def __init__(self, config: FalconH1Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(FalconH1DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionContext, rows: RecurrentBatch
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids) * self.config.embedding_multiplier  # [B, T, H]
        cos, sin = rope_cos_sin(self.config, positions, x.dtype)  # [B, T, 1, 1, d]
        rope = (cos[:, :, 0], sin[:, :, 0])  # [B, T, 1, d]: broadcast over the heads
        for layer in self.layers:
            x = layer(x, rope, attention, rows)
        return self.final_layernorm(x)


@dataclass
class HybridCache:
    """The HF-style call's cache: attention K/V (grows to ``max_len``) and one recurrent slot per batch row."""

    kv: KVCache
    state: RecurrentState

    @property
    def length(self) -> int:
        return self.kv.length

    def nbytes(self) -> int:
        return self.kv.nbytes() + self.state.conv.nbytes + self.state.ssm.nbytes


class FalconH1ForCausalLM(CausalLM):
    """Falcon-H1 with its language-model head (untied unless ``tie_word_embeddings``)."""

    decoder_name, embeddings_name, final_norm_name = "model", "embed_tokens", "final_layernorm"
    family_label = "Falcon-H1"

    def __init__(self, config: FalconH1Config) -> None:
        super().__init__()
        self.config = config
        self.model = FalconH1Model(config)
        self.lm_head = FalconLinear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: HybridCache | None = None,
        last_token_only: bool = False,
    ) -> torch.Tensor:
        """The HF-style call: logits [B, T, vocab] (or [B, 1, vocab] with ``last_token_only``).

        ``attention_mask`` [B, past + T] marks real tokens with 1 and left padding with 0. ``cache`` (from
        :meth:`new_cache`) is read and extended: K/V by T positions, the recurrent state to after these tokens.
        """
        B, T = input_ids.shape
        positions, attention = dense_inputs(
            self.config, input_ids, attention_mask, position_ids, cache.kv if cache else None, self.dtype
        )
        past = cache.length if cache is not None else 0
        state = self._new_state(B) if cache is None else cache.state
        token_mask = None
        if attention_mask is not None and past == 0 and not bool(attention_mask.all()):
            token_mask = attention_mask[:, past:].reshape(-1)
        rows = RecurrentBatch.dense(state, B, T, fresh=past == 0, token_mask=token_mask)
        hidden = self.forward_hidden(input_ids, positions, attention, rows)
        if cache is not None:
            cache.kv.length += T
        return self._logits(hidden, last_token_only)

    def forward_hidden(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionContext, rows: RecurrentBatch
    ) -> torch.Tensor:
        """Hidden states [B, T, H] after the final norm (see :meth:`FalconH1Model.forward`)."""
        return self.model(input_ids, positions, attention, rows)

    def compute_logits(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``hidden`` [..., H] (or with ``rows`` only those rows of the flattened states, as
        [R, vocab]), scaled by ``lm_head_multiplier``."""
        logits = super().compute_logits(hidden, rows)
        multiplier = self.config.lm_head_multiplier
        return logits * multiplier if multiplier != 1.0 else logits

    def new_cache(self, batch_size: int, max_len: int) -> HybridCache:
        """A cache for ``batch_size`` rows of up to ``max_len`` positions, in the model's dtype and device."""
        kv = KVCache(self.config, batch_size, max_len, self.dtype, self.device)
        return HybridCache(kv, self._new_state(batch_size))

    def new_recurrent_state(self, num_slots: int) -> RecurrentState:
        """``num_slots`` sequences' conv and SSM state for every layer (the engine's pool)."""
        return self._new_state(num_slots)

    def _new_state(self, num_slots: int) -> RecurrentState:
        c = self.config
        ssm_shape = (c.mamba_n_heads, c.mamba_d_head, c.mamba_d_state)
        return RecurrentState.allocate(
            c.num_hidden_layers, num_slots, c.conv_dim, c.mamba_d_conv, ssm_shape, self.dtype, self.device
        )

    def _init_own(self, module: nn.Module) -> None:
        """Mamba's output norm at identity; its A, D and Δ bias as transformers starts them."""
        if isinstance(module, GatedRMSNorm):
            module.weight.data.fill_(1.0)
        elif isinstance(module, FalconH1Mixer):
            module.dt_bias.data.fill_(1.0)
            module.D.data.fill_(1.0)
            module.A_log.data.copy_(torch.log(torch.arange(1, module.num_heads + 1, dtype=torch.float32)))
