"""The attention seam: what a Falcon attention layer asks of the outside, and grouped-query SDPA.

The model computes post-RoPE ``q`` [B, Hq, T, d] and ``k``/``v`` [B, G, T, d] and hands them to an attention
context's ``attend(layer, q, k, v)``. The context owns where K/V live and the mask: none or a contiguous cache
(``dense.py``, the HF-style call) or a paged cache (``paged_attention.py``, the serving engine). K/V are never
broadcast to all query heads in memory: SDPA's ``enable_gqa`` maps query head ``h`` to group ``h // (Hq / G)``,
which is Falcon's fused-QKV order (falcon-spec §2).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# SDPA's backends on CUDA, without cuDNN's: PyTorch compiles a cuDNN attention graph for each new sequence length
# (pytorch/pytorch#155958 makes avoiding that opt-in), which takes a large part of a second, and a decode step's
# key length grows by one every step. Flash and memory-efficient attention have no such per-shape cost.
CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa_backends(device: torch.device) -> contextlib.AbstractContextManager:
    """The SDPA backends allowed for attention on ``device``: :data:`CUDA_SDPA_BACKENDS` on CUDA, else torch's."""
    return sdpa_kernel(CUDA_SDPA_BACKENDS) if device.type == "cuda" else contextlib.nullcontext()


class AttentionContext(Protocol):
    """What a Falcon attention layer needs from the outside for one forward pass."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this step's ``k``/``v`` if there is a cache, attend, and return [B, Hq, T, d]."""
        ...

    def decode_rows(self) -> DecodeRows | None:
        """Where each row's K/V live when this pass adds exactly one token per row (in order) to a cache and
        attends over everything before it with no mask or bias (RoPE decode steps); else None."""
        ...


@dataclass
class DecodeRows:
    """A decode step's rows and their cached K/V, for kernels that write and read the cache themselves.

    Element (layer l, block b, position p, group g, dim i) of ``k`` / ``v`` is at
    ``l * layer_stride + b * sb + p * sp + g * sg + i``; row r's positions 0..context_lens[r]-1 live in blocks
    ``block_tables[r, 0], [r, 1], ...`` of ``block_size`` positions. This step's token of row r goes to position
    ``context_lens[r] - 1``. An ALiBi model's rows carry its score bias for every position they reach (``alibi``,
    the values its torch path adds, already divided by sqrt(head_dim)), with 16 columns past the last head.
    """

    k: torch.Tensor
    v: torch.Tensor
    layer_stride: int
    sb: int
    sp: int
    sg: int
    block_size: int
    block_tables: torch.Tensor  # [R, max_blocks] int64, contiguous
    context_lens: torch.Tensor  # [R] int64: lengths after this step
    alibi: torch.Tensor | None = None  # ALiBi models: float32 [positions, Hq + pad] score bias by key position, head


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention with grouped K/V (no copy of K/V per query head).

    A single query position with grouped K/V (a decode step) is attended as each group's query heads at once:
    [B, G, heads per group, d] against the group's keys, one matrix product per group instead of one
    matrix-vector product per head (the heads of group g are g * per_group ... in Falcon's order). On CUDA it runs
    without cuDNN's backend (:data:`CUDA_SDPA_BACKENDS`).
    """
    B, Hq, T, d = q.shape
    G = k.shape[1]
    with sdpa_backends(q.device):
        if T == 1 and Hq != G and not is_causal and dropout_p == 0.0:
            if mask is not None and mask.shape[1] != 1:
                mask = mask.reshape(mask.shape[0], G, Hq // G, mask.shape[-1])
            out = F.scaled_dot_product_attention(q.reshape(B, G, Hq // G, d), k, v, attn_mask=mask)
            return out.reshape(B, Hq, 1, d)  # CUDA's SDPA kernels may return another memory layout than CPU's
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p, enable_gqa=Hq != G
        )
