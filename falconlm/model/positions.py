"""Position information for Falcon: rotary embeddings (NeoX half rotation) and ALiBi biases.

References: RoFormer (Su et al. 2021) for RoPE, "Train Short, Test Long" (Press et al. 2021) for ALiBi, and
falcon-spec §4.1 / §4.3 for the exact rounding transformers uses, which we reproduce for parity.
"""

from __future__ import annotations

import functools
import math

import torch

from .config import FalconConfig


def rope_inv_freq(config: FalconConfig, seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies ``1 / theta^(2i/d)`` in float32, with linear or dynamic-NTK scaling applied.

    As transformers' Falcon computes them (``modeling_rope_utils``, 4.4x-4.5x): ``linear`` divides every
    frequency by ``factor`` (the same as dividing positions by it); ``dynamic`` leaves them alone up to
    ``max_position_embeddings`` and, for a sequence of ``seq_len`` > that, raises the base to
    ``theta * (factor * seq_len / max_pos - (factor - 1)) ** (d / (d - 2))``. Like transformers, dynamic scaling
    measures against ``max_position_embeddings`` (it reads no ``original_max_position_embeddings``).
    """
    dim = config.head_dim
    base: float | torch.Tensor = float(config.rope_theta)
    scaling = config.rope_scaling
    original = config.max_position_embeddings
    if scaling is not None and scaling.rope_type == "dynamic" and seq_len is not None and seq_len > original:
        # In float32 tensors, as transformers computes it from a tensor length (bit-equal frequencies).
        stretch = scaling.factor * torch.tensor(seq_len) / original - (scaling.factor - 1)
        base = base * stretch ** (dim / (dim - 2))
    return _inv_freq(dim, base, _linear_factor(config))


def _linear_factor(config: FalconConfig) -> float | None:
    scaling = config.rope_scaling
    return scaling.factor if scaling is not None and scaling.rope_type == "linear" else None


def _inv_freq(dim: int, base: float | torch.Tensor, linear_factor: float | None) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (base**exponents)
    return inv_freq if linear_factor is None else inv_freq / linear_factor


@functools.lru_cache(maxsize=64)
def _fixed_inv_freq(dim: int, base: float, linear_factor: float | None, device: torch.device) -> torch.Tensor:
    """:func:`_inv_freq` for a base that no sequence length changes, made once per device: a decode step's
    cos / sin need a few microseconds of work, and this saves most of it. Shared, so never written to."""
    return _inv_freq(dim, base, linear_factor).to(device)


def is_dynamic(config: FalconConfig) -> bool:
    """True when the rotation of a position depends on the sequence's length (dynamic NTK scaling)."""
    return config.rotary and config.rope_scaling is not None and config.rope_scaling.rope_type == "dynamic"


def rope_cos_sin(
    config: FalconConfig, positions: torch.Tensor, dtype: torch.dtype, rope_lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for ``positions`` [B, T]: angles in float32, then cast to the activation dtype.

    With dynamic scaling the frequencies depend on a sequence length: ``rope_lengths`` [B, T] gives it per token
    (the serving engine, whose flattened step mixes sequences; see :func:`engine_rope_lengths`); without it the
    whole call uses ``positions.max() + 1``, as one transformers forward does for its batch.

    Returns two tensors of shape [B, T, 1, 1, head_dim], ready to broadcast over the KV groups and the heads
    of each (the fused QKV layout, falcon-spec §2).
    """
    if is_dynamic(config) and rope_lengths is not None and positions.numel():
        lengths, which = torch.unique(rope_lengths.reshape(-1), return_inverse=True)
        table = torch.stack([rope_inv_freq(config, int(n)) for n in lengths.tolist()]).to(positions.device)
        inv_freq = table[which].view(*positions.shape, -1)  # [B, T, d/2], each token its sequence's frequencies
    elif is_dynamic(config):
        seq_len = int(positions.max()) + 1 if positions.numel() else None
        inv_freq = rope_inv_freq(config, seq_len).to(positions.device)
    else:
        inv_freq = _fixed_inv_freq(config.head_dim, float(config.rope_theta), _linear_factor(config), positions.device)
    angles = positions.float()[..., None] * inv_freq  # [B, T, d/2]
    emb = torch.cat((angles, angles), dim=-1)  # [B, T, d]
    return emb.cos().to(dtype)[:, :, None, None], emb.sin().to(dtype)[:, :, None, None]


def engine_rope_length(num_prompt_tokens: int, position: int) -> int:
    """The sequence length whose dynamic-NTK frequencies rotate the token at ``position`` of a request.

    It reproduces transformers' ``generate`` for one request: the prompt is one forward of its whole length (every
    prompt token, however the engine chunks it, uses ``num_prompt_tokens``), and each later token is a forward
    whose length reaches just past it (``position + 1``). Keys keep the rotation they were written with, as in
    transformers' cache, so the result does not depend on chunking, batching or preemption (a recomputed token
    gets the same length again).
    """
    return max(num_prompt_tokens, position + 1)


def prompt_rope_salt(config: FalconConfig, num_prompt_tokens: int) -> int | None:
    """What, beside the tokens, a prompt's cached keys depend on: with dynamic scaling and a prompt longer than
    ``max_position_embeddings``, its length (every prompt key is rotated by frequencies of that length), so the
    prefix cache must not share those blocks with a prompt of another length. None otherwise."""
    if is_dynamic(config) and num_prompt_tokens > config.max_position_embeddings:
        return num_prompt_tokens
    return None


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


def head_alibi_slopes(config: FalconConfig) -> torch.Tensor:
    """The ALiBi slopes of the heads ``config``'s model computes. A slope depends on the head's index among all
    heads: a tensor-parallel rank's config (``alibi_heads`` = (first head, all heads)) gets its heads' slopes."""
    first, total = getattr(config, "alibi_heads", (0, config.num_attention_heads))
    return alibi_slopes(total)[first : first + config.num_attention_heads]


def alibi_bias(
    key_mask: torch.Tensor, num_heads: int, dtype: torch.dtype, slopes: torch.Tensor | None = None
) -> torch.Tensor:
    """ALiBi bias [B, heads, 1, S] from the 2-D key mask [B, S] (``slopes``: the heads' own, default the first
    ``num_heads`` of ``num_heads``).

    Key positions come from the mask (0 at the first real token and at every pad). As in transformers the slopes
    are rounded to bfloat16 and the product is computed in bfloat16, even for a float32 model.
    """
    key_positions = (key_mask.long().cumsum(-1) - 1) * key_mask.long()  # [B, S]
    slopes = (alibi_slopes(num_heads) if slopes is None else slopes).to(key_mask.device).bfloat16()
    bias = slopes[None, :, None] * key_positions[:, None, :]  # [B, heads, S], bfloat16
    return bias.to(dtype)[:, :, None, :]


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Padding-aware positions: ``cumsum(mask) - 1``, with pads set to 1 as transformers' generate does."""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)
