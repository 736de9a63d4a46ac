"""Attention over a paged KV cache: the serving engine's flattened steps.

A step concatenates every row's new tokens into one sequence of N tokens (batch dimension 1). Each new token's
K/V goes to its *slot* (``block_id * block_size + offset``) in the cache ``[num_blocks, block_size, G, d]`` of
its layer, and each row then attends over its own blocks, gathered through its block table. Rows that add one
token (decodes) are attended together in one call (by the ``row_attention`` kernel the runner gives, which reads
the blocks in place, else gathered for SDPA); rows with several new tokens (prefill chunks) one by one, with a
causal mask offset by what the row already had in the cache. With ``per_token_chunks`` a chunk's tokens go
through the row kernel too, each as a row of its own length: every query position is then computed the same way
however the prompt was split into chunks and whatever else shares the step. ALiBi models give the row kernel a
bias table by key position and head, with the values SDPA gets as its mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch

from .attention import DecodeRows, sdpa

# q [R, Hq, d], k / v blocks, block tables [R, max_blocks], context lengths [R], the longest length, the ALiBi
# bias by key position and query head (or None) -> [R, Hq, d] (None when the kernel cannot take these tensors; the
# caller then uses SDPA).
MASK_ELEMENTS = 1 << 24  # most query x head x key elements of one masked SDPA call over a prompt chunk
RowAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor | None],
    torch.Tensor | None,
]
BIAS_PAD = 16  # columns past the heads in the row kernel's bias table (it reads 16 heads at a time)


@dataclass
class PagedKVCache:
    """K and V blocks of every layer: [layers, num_blocks, block_size, G, d] each."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_groups: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> PagedKVCache:
        shape = (num_layers, num_blocks, block_size, num_kv_groups, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_groups: int, head_dim: int, itemsize: int) -> int:
        return 2 * num_layers * block_size * num_kv_groups * head_dim * itemsize


@dataclass
class PagedAttention:
    """The attention context of one engine step (see module docstring).

    ``query_starts``/``query_lens`` locate each row's new tokens in the flattened step, ``context_lens`` is the
    row's total length after the step, ``block_tables`` [rows, max_blocks] lists its blocks (padded with 0).
    """

    cache: PagedKVCache
    slot_mapping: torch.Tensor  # [N] long
    query_starts: list[int]
    query_lens: list[int]
    context_lens: list[int]
    block_tables: torch.Tensor  # [rows, max_blocks] long
    alibi_slopes: torch.Tensor | None = None  # [Hq] float32 ALiBi slopes; None for RoPE models
    row_attention: RowAttention | None = None  # one query position per row, read in place (see module docstring)
    per_token_chunks: bool = False  # prefill chunks through row_attention too, a row per token
    _decode_mask_cache: tuple[torch.Tensor | None] | None = field(default=None, repr=False)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [1, Hq, N, d]; k, v: [1, G, N, d]
        k_blocks, v_blocks = self.cache.k[layer], self.cache.v[layer]  # [num_blocks, block_size, G, d]
        G, d = k_blocks.shape[2], k_blocks.shape[3]
        k_blocks.view(-1, G, d).index_copy_(0, self.slot_mapping, k[0].transpose(0, 1))
        v_blocks.view(-1, G, d).index_copy_(0, self.slot_mapping, v[0].transpose(0, 1))
        out = torch.empty_like(q)
        if self._decode_rows:
            self._attend_decodes(q, out, k_blocks, v_blocks)
        for r, n in enumerate(self.query_lens):
            if n > 1 and not (self.per_token_chunks and self._attend_chunk_by_rows(r, q, out, k_blocks, v_blocks)):
                self._attend_chunk(r, q, out, k_blocks, v_blocks)
        return out

    def decode_rows(self) -> DecodeRows | None:
        if not self.query_lens or len(self._decode_rows) != len(self.query_lens):
            return None
        k, v = self.cache.k, self.cache.v  # [layers, num_blocks, block_size, G, d]
        tables, lengths = self._decode_tables  # every row is a decode row, in order
        return DecodeRows(
            k, v, k.stride(0), k.stride(1), k.stride(2), k.stride(3), k.shape[2], tables, lengths, self._alibi_table
        )

    def token_rows(self) -> DecodeRows | None:
        """Every new token of the step as a row of its own, a prompt chunk's tokens each up to itself (the fused
        step's form of ``per_token_chunks``: prompts and decodes then take one path)."""
        if not self.query_lens:
            return None
        owner = [r for r, n in enumerate(self.query_lens) for _ in range(n)]
        lengths = [end - n + 1 + j for n, end in zip(self.query_lens, self.context_lens, strict=True) for j in range(n)]
        k, v = self.cache.k, self.cache.v
        tables = self.block_tables[_as_slice(owner) or owner].contiguous()
        return DecodeRows(
            k, v, k.stride(0), k.stride(1), k.stride(2), k.stride(3), k.shape[2], tables, torch.tensor(lengths),
            self._alibi_table,
        )  # fmt: skip

    @cached_property
    def _decode_rows(self) -> list[int]:
        """Rows adding one token this step: attended together in one call."""
        return [r for r, n in enumerate(self.query_lens) if n == 1]

    @cached_property
    def _decode_lengths(self) -> list[int]:
        """The decode rows' context lengths after this step."""
        return [self.context_lens[r] for r in self._decode_rows]

    @cached_property
    def _decode_positions(self) -> torch.Tensor | slice:
        """Where the decode rows' queries sit in the flattened step: a slice when they are side by side (every
        step of decodes alone), so that reading and writing them makes no index kernels."""
        starts = [self.query_starts[r] for r in self._decode_rows]
        return _as_slice(starts) or torch.tensor(starts, device=self.slot_mapping.device)

    @cached_property
    def _decode_block_table(self) -> torch.Tensor:
        """The decode rows' block tables up to their longest length, shared by the K and V gathers of every
        layer of the step (a view when the rows are side by side; else one index, which on a GPU is a copy from
        the host that waits for the device, once a step instead of twice a layer)."""
        rows = _as_slice(self._decode_rows) or self._decode_rows
        num = -(-max(self._decode_lengths) // self.cache.k.shape[2])
        return self.block_tables[rows, :num]

    def _decode_mask(self, q: torch.Tensor) -> torch.Tensor | None:
        """The decode rows' additive mask [R, 1 or Hq, 1, L] for SDPA (the same for every layer of the step): None
        when every row has the same length and there is no ALiBi."""
        if self._decode_mask_cache is None:
            lengths = self._decode_lengths
            longest = max(lengths)
            mask = None
            if self.alibi_slopes is not None or any(n != longest for n in lengths):
                key_pos = torch.arange(longest, device=q.device)
                valid = key_pos[None, :] < torch.tensor(lengths, device=q.device)[:, None]  # [R, L]
                mask = torch.zeros(valid.shape, dtype=q.dtype, device=q.device)
                mask = mask.masked_fill(~valid, torch.finfo(q.dtype).min)[:, None, None, :]  # [R, 1, 1, L]
                if self.alibi_slopes is not None:
                    mask = mask + self._alibi(key_pos, q.dtype, q.shape[-1])[None]  # [R, Hq, 1, L]
            self._decode_mask_cache = (mask,)
        return self._decode_mask_cache[0]

    @cached_property
    def _decode_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode rows' block tables [R, max_blocks] and context lengths [R], for the native kernel."""
        lengths = torch.tensor(self._decode_lengths, dtype=torch.int64)
        rows = _as_slice(self._decode_rows) or self._decode_rows  # a view of every row, in a decode-only step
        return self.block_tables[rows].contiguous(), lengths

    def _gather(self, rows: list[int], blocks: torch.Tensor, length: int, table: torch.Tensor | None = None):
        """K or V of ``rows`` as [R, G, length, d], read through their block tables (``table``: those rows'
        tables already cut to ``length``)."""
        block_size = blocks.shape[1]
        num = -(-length // block_size)
        if table is None:  # a slice where it can: a list index is a host-to-device copy on a GPU
            table = self.block_tables[_as_slice(rows) or rows, :num]  # [R, num]
        gathered = blocks[table]  # [R, num, block_size, G, d]
        R, _, _, G, d = gathered.shape
        return gathered.view(R, num * block_size, G, d)[:, :length].transpose(1, 2)

    def _attend_decodes(
        self, q: torch.Tensor, out: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor
    ) -> None:
        positions, longest = self._decode_positions, max(self._decode_lengths)
        if self.row_attention is not None:  # read in place (no gathered copy)
            tables, lengths = self._decode_tables
            queries = q[0, :, positions].transpose(0, 1)
            result = self.row_attention(queries, k_blocks, v_blocks, tables, lengths, longest, self._alibi_table)
            if result is not None:
                out[0, :, positions] = result.transpose(0, 1)
                return
        keys = self._gather(self._decode_rows, k_blocks, longest, self._decode_block_table)  # [R, G, L, d]
        values = self._gather(self._decode_rows, v_blocks, longest, self._decode_block_table)
        queries = q[0, :, positions].transpose(0, 1)[:, :, None]  # [R, Hq, 1, d]
        result = sdpa(queries, keys, values, self._decode_mask(q), is_causal=False)  # [R, Hq, 1, d]
        out[0, :, positions] = result[:, :, 0].transpose(0, 1)

    def _attend_chunk_by_rows(
        self, r: int, q: torch.Tensor, out: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor
    ) -> bool:
        """Row r's chunk through ``row_attention``, one row per token; False when the kernel cannot take it."""
        if self.row_attention is None:
            return False
        start, n, length = self.query_starts[r], self.query_lens[r], self.context_lens[r]
        tables = self.block_tables[r].expand(n, -1).contiguous()
        lengths = torch.arange(length - n + 1, length + 1, dtype=torch.int64)
        queries = q[0, :, start : start + n].transpose(0, 1)  # [n, Hq, d]
        result = self.row_attention(queries, k_blocks, v_blocks, tables, lengths, length, self._alibi_table)
        if result is None:
            return False
        out[0, :, start : start + n] = result.transpose(0, 1)
        return True

    def _attend_chunk(
        self, r: int, q: torch.Tensor, out: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor
    ) -> None:
        start, n, length = self.query_starts[r], self.query_lens[r], self.context_lens[r]
        keys = self._gather([r], k_blocks, length)  # [1, G, L, d]
        values = self._gather([r], v_blocks, length)
        queries = q[:, :, start : start + n]  # [1, Hq, n, d]
        past = length - n
        if past == 0 and self.alibi_slopes is None:
            out[:, :, start : start + n] = sdpa(queries, keys, values, None, is_causal=True)
            return
        key_pos = torch.arange(length, device=q.device)
        alibi = None if self.alibi_slopes is None else self._alibi(key_pos, q.dtype, q.shape[-1])[None]  # [1, Hq, 1, L]
        # The mask (and the scores SDPA makes beside it) grow as queries x heads x keys: a long prompt in one chunk
        # goes through in blocks of queries (each row's softmax is its own), each against the keys up to its end.
        step = max(1, MASK_ELEMENTS // (q.shape[1] * length))
        for i in range(0, n, step):
            m, end = min(step, n - i), min(past + i + step, length)
            q_pos = torch.arange(past + i, end, device=q.device)[:, None]
            mask = torch.zeros(m, end, dtype=q.dtype, device=q.device)
            mask = mask.masked_fill(key_pos[None, :end] > q_pos, torch.finfo(q.dtype).min)[None, None]  # [1, 1, m, E]
            if alibi is not None:
                mask = torch.where(mask == 0, alibi[..., :end], mask)  # [1, Hq, m, E]
            block = sdpa(queries[:, :, i : i + m], keys[:, :, :end], values[:, :, :end], mask, is_causal=False)
            out[:, :, start + i : start + i + m] = block

    @cached_property
    def _alibi_table(self) -> torch.Tensor | None:
        """The ALiBi bias for the row kernel, the same values as :meth:`_alibi` gives SDPA: float32 [positions,
        Hq + BIAS_PAD] by key position and query head, up to the step's longest row; None without ALiBi. A
        position's values do not depend on the table's length, so a token gets the same bias in any step."""
        if self.alibi_slopes is None:
            return None
        return alibi_table(self.alibi_slopes, max(self.context_lens), self.cache.k.dtype, self.cache.k.shape[-1])

    def _alibi(self, key_pos: torch.Tensor, dtype: torch.dtype, head_dim: int) -> torch.Tensor:
        """[Hq, 1, L] ALiBi bias over key positions ``key_pos``, rounded exactly as the dense path rounds it."""
        return alibi_scores(self.alibi_slopes, key_pos, dtype, head_dim)[:, None]


def alibi_scores(slopes: torch.Tensor, key_pos: torch.Tensor, dtype: torch.dtype, head_dim: int) -> torch.Tensor:
    """[Hq, L] ALiBi score bias of heads with ``slopes`` over key positions ``key_pos``: the slopes rounded to
    bfloat16 times the positions in bfloat16 (as transformers computes it), in ``dtype``, over sqrt(head_dim)."""
    bias = slopes.bfloat16()[:, None] * key_pos.to(slopes.device)[None, :]
    return bias.to(dtype) / math.sqrt(head_dim)


def alibi_table(slopes: torch.Tensor, positions: int, dtype: torch.dtype, head_dim: int) -> torch.Tensor:
    """:func:`alibi_scores` over key positions 0 .. ``positions`` - 1 as the row kernels read them: float32
    [positions, Hq + BIAS_PAD]. A position's values do not depend on ``positions``."""
    heads = slopes.shape[0]
    bias = alibi_scores(slopes, torch.arange(positions), dtype, head_dim)
    table = torch.zeros(positions, heads + BIAS_PAD, dtype=torch.float32, device=bias.device)
    table[:, :heads] = bias.T
    return table


def _as_slice(indices: list[int]) -> slice | None:
    """``indices`` as a slice when they are consecutive and ascending, else None."""
    if indices and indices == list(range(indices[0], indices[0] + len(indices))):
        return slice(indices[0], indices[0] + len(indices))
    return None
