"""Dense (non-paged) attention: a contiguous KV cache and the masks of the HF-style call.

``FalconForCausalLM(ids, attention_mask=..., kv_cache=...)`` runs the one model forward with a
:class:`DenseAttention` context built here by :func:`dense_inputs`: left padding, causality and ALiBi become one
additive mask (or none where SDPA's own causal flag or a plain decode step is exact), and K/V go to a
:class:`KVCache` of [layers, B, G, max_len, d] filled left to right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .attention import DecodeRows, sdpa
from .config import FalconConfig
from .paged_attention import alibi_table
from .positions import alibi_bias, head_alibi_slopes, positions_from_mask


class KVCache:
    """Preallocated K and V for every layer: [layers, B, G, max_len, d], filled left to right."""

    def __init__(
        self,
        config: FalconConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (config.num_hidden_layers, batch_size, config.num_kv_groups, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # positions filled so far (the same for every row: rows are left-padded)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


@dataclass
class DenseAttention:
    """Attention for a [B, T] batch, optionally reading and extending a contiguous :class:`KVCache`.

    ``mask`` is an additive bias [B, 1 or Hq, T, S] (padding, causality and ALiBi folded in), or None when plain
    causal attention (``is_causal``) or full attention over the cache (single-token decode) is exact.
    """

    mask: torch.Tensor | None
    is_causal: bool
    cache: KVCache | None = None
    past: int = 0
    dropout_p: float = 0.0
    alibi_table: torch.Tensor | None = None  # an unpadded ALiBi decode step's mask as DecodeRows.alibi (see there)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            end = self._cache_end(k.shape[2])
            self.cache.k[layer, :, :, self.past : end] = k
            self.cache.v[layer, :, :, self.past : end] = v
            k = self.cache.k[layer, :, :, :end]
            v = self.cache.v[layer, :, :, :end]
        return sdpa(q, k, v, self.mask, self.is_causal, self.dropout_p)

    def decode_rows(self) -> DecodeRows | None:
        # A single-token step with a cache and without padding: no mask, or ALiBi's alone (see below).
        masked = self.mask is not None and self.alibi_table is None
        if self.cache is None or self.is_causal or self.dropout_p or masked:
            return None
        k, v = self.cache.k, self.cache.v  # [layers, B, G, S, d]: one block of S positions per row
        end, rows = self._cache_end(1), k.shape[1]
        return DecodeRows(
            k, v, k.stride(0), k.stride(1), k.stride(3), k.stride(2), self.cache.max_len,
            torch.arange(rows, dtype=torch.int64)[:, None], torch.full((rows,), end, dtype=torch.int64),
            self.alibi_table,
        )  # fmt: skip

    def _cache_end(self, new: int) -> int:
        """The cache length after ``new`` more positions; ValueError when the cache cannot hold them."""
        end = self.past + new
        if end > self.cache.max_len:
            raise ValueError(f"KV cache holds {self.cache.max_len} positions, the batch needs {end}")
        return end


def build_dense_attention(
    config: FalconConfig,
    query_len: int,
    key_mask: torch.Tensor | None,
    cache: KVCache | None,
    dtype: torch.dtype,
    device: torch.device,
    batch_size: int,
    dropout_p: float = 0.0,
) -> DenseAttention:
    """Choose the cheapest exact mask for a forward of ``query_len`` new tokens after ``cache.length`` old ones.

    ``key_mask`` [B, past + T] marks real tokens (1) and left padding (0); None means no padding.
    """
    past = cache.length if cache is not None else 0
    total = past + query_len
    if key_mask is None and not config.alibi:
        # Unpadded RoPE batches: causal for a prompt, everything for a one-token decode step.
        causal = query_len > 1
        if causal and past:  # chunked prefill after a cache: explicit mask needed
            return DenseAttention(
                _additive_mask(None, past, query_len, total, dtype, device, batch_size), False, cache, past, dropout_p
            )
        return DenseAttention(None, causal, cache, past, dropout_p)
    if key_mask is not None and key_mask.shape[-1] != total:
        raise ValueError(f"attention_mask covers {key_mask.shape[-1]} positions, expected {total}")
    mask = _additive_mask(key_mask, past, query_len, total, dtype, device, batch_size)
    if config.alibi:
        full_mask = key_mask if key_mask is not None else torch.ones(batch_size, total, dtype=torch.long, device=device)
        slopes = head_alibi_slopes(config)  # a tensor-parallel rank: its own heads' slopes
        bias = alibi_bias(full_mask, config.num_attention_heads, dtype, slopes) / math.sqrt(config.head_dim)
        mask = torch.where(mask == 0, bias, mask)  # [B, Hq, T, S]
        if key_mask is None and query_len == 1:  # every row's bias is the same: one table by position and head
            table = alibi_table(slopes.to(device), total, dtype, config.head_dim)
            return DenseAttention(mask, False, cache, past, dropout_p, table)
    return DenseAttention(mask, False, cache, past, dropout_p)


def _additive_mask(
    key_mask: torch.Tensor | None,
    past: int,
    query_len: int,
    total: int,
    dtype: torch.dtype,
    device: torch.device,
    batch_size: int,
) -> torch.Tensor:
    """0 where query i (absolute position past + i) may see key j, the dtype's minimum elsewhere: [B, 1, T, S]."""
    q_pos = torch.arange(past, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]  # [1, 1, T, S]
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, None, :]
        allowed = allowed | (k_pos == q_pos)[None, None]  # a pad query sees itself: no all-masked rows
    allowed = allowed.expand(batch_size, 1, query_len, total)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def dense_inputs(
    config: FalconConfig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    kv_cache: KVCache | None,
    dtype: torch.dtype,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, DenseAttention]:
    """Positions [B, T] and the attention context of an HF-style call on ``input_ids`` [B, T].

    Positions continue after ``kv_cache.length``; with ``attention_mask`` [B, past + T] they skip the left
    padding as transformers' generate does. ``dtype`` is the activations' (the mask's dtype).
    """
    B, T = input_ids.shape
    past = kv_cache.length if kv_cache is not None else 0
    if position_ids is None:
        if attention_mask is not None:
            position_ids = positions_from_mask(attention_mask)[:, past:]
        else:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
    ctx = build_dense_attention(config, T, attention_mask, kv_cache, dtype, input_ids.device, B, dropout_p)
    return position_ids, ctx
