"""Position information for Falcon: rotary embeddings (NeoX half rotation) and ALiBi biases.

References: RoFormer (Su et al. 2021) for RoPE, "Train Short, Test Long" (Press et al. 2021) for ALiBi, and
falcon-spec §4.1 / §4.3 for the exact rounding transformers uses, which we reproduce for parity.
"""

from __future__ import annotations

import math

import torch

from .config import FalconConfig


def rope_inv_freq(config: FalconConfig, seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies ``1 / theta^(2i/d)`` in float32, with linear or dynamic-NTK scaling applied."""
    dim = config.head_dim
    base = float(config.rope_theta)
    scaling = config.rope_scaling
    if scaling is not None and scaling.rope_type == "dynamic":
        original = scaling.original_max_position_embeddings or config.max_position_embeddings
        seq_len = max(seq_len or original, original)
        base = base * ((scaling.factor * seq_len / original) - (scaling.factor - 1)) ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (base**exponents)
    if scaling is not None and scaling.rope_type == "linear":
        inv_freq = inv_freq / scaling.factor
    return inv_freq


def rope_cos_sin(
    config: FalconConfig, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for ``positions`` [B, T]: angles in float32, then cast to the activation dtype.

    Returns two tensors of shape [B, T, 1, 1, head_dim], ready to broadcast over the KV groups and the heads
    of each (the fused QKV layout, falcon-spec §2).
    """
    seq_len = int(positions.max()) + 1 if config.rope_scaling is not None and positions.numel() else None
    inv_freq = rope_inv_freq(config, seq_len).to(positions.device)
    angles = positions.float()[..., None] * inv_freq  # [B, T, d/2]
    emb = torch.cat((angles, angles), dim=-1)  # [B, T, d]
    return emb.cos().to(dtype)[:, :, None, None], emb.sin().to(dtype)[:, :, None, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """NeoX style: (x1, x2) -> (-x2, x1) over the two halves of the head dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, T, groups, heads, d] by the position angles (cos and sin from :func:`rope_cos_sin`)."""
    return x * cos + rotate_half(x) * sin


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes (float32), including the interleaved extra slopes for non-power-of-two counts."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        extra = torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))
        slopes = torch.cat([slopes, extra])
    return slopes


def alibi_bias(key_mask: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """ALiBi bias [B, heads, 1, S] from the 2-D key mask [B, S].

    Key positions come from the mask (0 at the first real token and at every pad). As in transformers the slopes
    are rounded to bfloat16 and the product is computed in bfloat16, even for a float32 model.
    """
    key_positions = (key_mask.long().cumsum(-1) - 1) * key_mask.long()  # [B, S]
    slopes = alibi_slopes(num_heads).to(key_mask.device).bfloat16()
    bias = slopes[None, :, None] * key_positions[:, None, :]  # [B, heads, S], bfloat16
    return bias.to(dtype)[:, :, None, :]


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Padding-aware positions: ``cumsum(mask) - 1``, with pads set to 1 as transformers' generate does."""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)
