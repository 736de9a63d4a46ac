"""Pure quantize / dequantize / pack functions: int8 per output channel, int4 per group along the input dim.

The formats (what a quantized checkpoint stores, whatever kernel runs it later):

* int8: ``w[n, k] ≈ scales[n] * q[n, k]`` with ``q`` int8 in [-127, 127] and ``scales[n] = max|w[n]| / 127``.
* int4: ``w[n, k] ≈ scales[n, k // g] * (q[n, k] - 8) + zeros[n, k // g]`` with ``q`` in [0, 15]. Asymmetric
  (default): a group's minimum maps to ``q = 0`` and its maximum to ``q = 15``. Symmetric: ``zeros = 0`` and the
  group's value of largest magnitude maps to ``q - 8 = -8`` exactly (its scale may be negative), as llama.cpp's
  q4_0 does. Two values per byte: ``k`` even in the low nibble, ``k + 1`` in the high one.

When ``g`` does not divide the input width, a smaller group or padding is chosen by :func:`plan_groups`; padded
columns repeat the row's last value (so they do not widen the last group's range) and meet zero activations.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

GROUP_SIZES = (32, 64, 128)
INT8_MAX = 127
ROWS_PER_CHUNK_ELEMENTS = 1 << 22  # quantize a row block at a time: float32 temporaries of 16 MB at most


@dataclass(frozen=True)
class GroupPlan:
    """How one int4 matrix is grouped: ``group_size`` along ``padded_in`` columns (``in_features`` of them real)."""

    group_size: int
    in_features: int
    padded_in: int
    note: str | None = None  # why the plan differs from the requested group size, None when it does not

    @property
    def num_groups(self) -> int:
        return self.padded_in // self.group_size


def plan_groups(in_features: int, group_size: int) -> GroupPlan:
    """The grouping for a matrix ``in_features`` wide: the requested size when it divides the width, else the
    largest smaller supported size that does, else the requested size over zero-activation padding."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group size {group_size} is not supported; use one of {GROUP_SIZES}")
    if in_features % group_size == 0:
        return GroupPlan(group_size, in_features, in_features)
    for smaller in sorted((g for g in GROUP_SIZES if g < group_size), reverse=True):
        if in_features % smaller == 0:
            note = f"{in_features} is not a multiple of {group_size}: groups of {smaller}"
            return GroupPlan(smaller, in_features, in_features, note)
    padded = -(-in_features // group_size) * group_size
    note = f"{in_features} is not a multiple of {group_size} or a smaller group size: padded to {padded}"
    return GroupPlan(group_size, in_features, padded, note)


@dataclass(frozen=True)
class QuantizedTensor:
    """One quantized [out_features, in_features] matrix in the stored format (see the module docstring).

    ``qweight``: int8 [N, K] (8 bits) or uint8 [N, padded_in / 2] (4 bits, packed); ``scales``: [N] or [N, G];
    ``zeros``: [N, G] for asymmetric int4, else None. ``group_size`` is 0 for int8.
    """

    bits: int
    in_features: int
    group_size: int
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def padded_in(self) -> int:
        return self.qweight.shape[1] * (2 if self.bits == 4 else 1)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.qweight, self.scales, self.zeros) if t is not None)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> QuantizedTensor:
        """Move to ``device``; cast scales and zeros (never the integers) to ``dtype``."""
        return replace(
            self,
            qweight=self.qweight.to(device),
            scales=self.scales.to(device, dtype),
            zeros=None if self.zeros is None else self.zeros.to(device, dtype),
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The [N, in_features] matrix the quantized values stand for, computed in float32, returned in ``dtype``."""
        if self.bits == 8:
            return dequantize_int8(self.qweight, self.scales).to(dtype)
        w = dequantize_int4(unpack_int4(self.qweight), self.scales, self.zeros, self.group_size)
        return w[:, : self.in_features].to(dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized rows ``ids`` (any shape) -> [*ids.shape, in_features]: an embedding lookup."""
        flat = ids.reshape(-1)
        q = self.qweight.index_select(0, flat)
        s = self.scales.index_select(0, flat)
        if self.bits == 8:
            w = dequantize_int8(q, s)
        else:
            z = None if self.zeros is None else self.zeros.index_select(0, flat)
            w = dequantize_int4(unpack_int4(q), s, z, self.group_size)[:, : self.in_features]
        return w.to(dtype).view(*ids.shape, self.in_features)


# ---- int8, per output channel -------------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> QuantizedTensor:
    """Symmetric int8 with one float32 scale per row of ``w`` [N, K]."""
    _check_matrix(w)
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.int8, device=w.device)
    scales = torch.empty(n, dtype=torch.float32, device=w.device)
    for rows in _row_blocks(n, k):
        block = _float_block(w, rows)
        s = block.abs().amax(dim=1) / INT8_MAX
        q[rows] = block.div_(_nonzero(s)[:, None]).round_().clamp_(-INT8_MAX, INT8_MAX)
        scales[rows] = s
    return QuantizedTensor(8, k, 0, q, scales)


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float()[:, None]


# ---- int4, per group along the input dim ----------------------------------------------------------------------
def quantize_int4(w: torch.Tensor, plan: GroupPlan, symmetric: bool = False) -> QuantizedTensor:
    """Group-wise int4 of ``w`` [N, plan.in_features], packed two per byte; float32 scales (and zeros)."""
    _check_matrix(w)
    n, k = w.shape
    if k != plan.in_features:
        raise ValueError(f"the plan is for {plan.in_features} input features, the matrix has {k}")
    g, groups = plan.group_size, plan.num_groups
    packed = torch.empty(n, plan.padded_in // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(n, groups, dtype=torch.float32, device=w.device)
    zeros = None if symmetric else torch.empty(n, groups, dtype=torch.float32, device=w.device)
    for rows in _row_blocks(n, plan.padded_in):
        block = _float_block(w, rows)
        if plan.padded_in > k:  # repeat the last column: the padding must not widen the last group's range
            block = torch.cat([block, block[:, -1:].expand(-1, plan.padded_in - k)], dim=1)
        block = block.view(-1, groups, g)  # [rows, G, g]
        if symmetric:
            idx = block.abs().argmax(dim=2, keepdim=True)
            s = block.gather(2, idx) / -8.0  # [rows, G, 1]
            q = block.div_(_nonzero(s)).round_().add_(8)
        else:
            lo, hi = block.amin(dim=2, keepdim=True), block.amax(dim=2, keepdim=True)
            s = (hi - lo) / 15.0
            q = block.sub_(lo).div_(_nonzero(s)).round_()
            zeros[rows] = (lo + 8.0 * s).squeeze(2)
        scales[rows] = s.squeeze(2)
        packed[rows] = pack_int4(q.clamp_(0, 15).to(torch.uint8).view(block.shape[0], -1))
    return QuantizedTensor(4, k, g, packed, scales, zeros)


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """float32 [N, K] from unpacked ``q`` [N, K] and per-group ``scales``/``zeros`` [N, K / group_size]."""
    n, k = q.shape
    w = (q.float() - 8.0).view(n, k // group_size, group_size) * scales.float()[:, :, None]
    if zeros is not None:
        w = w + zeros.float()[:, :, None]
    return w.view(n, k)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] holding values 0..15 -> uint8 [N, K / 2]: column ``2j`` low nibble, ``2j + 1`` high."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: uint8 [N, K / 2] -> uint8 [N, K] with values 0..15."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).view(*packed.shape[:-1], -1)


# ---- helpers ----------------------------------------------------------------------------------------------------
def _check_matrix(w: torch.Tensor) -> None:
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"expected a 2-D floating-point weight, got {w.dim()}-D {w.dtype}")


def _float_block(w: torch.Tensor, rows: slice) -> torch.Tensor:
    """A float32 copy of ``w[rows]``, free to be changed in place."""
    block = w[rows].to(torch.float32, copy=True)
    if not torch.isfinite(block).all():
        raise ValueError("the weight holds inf or nan; it cannot be quantized")
    return block


def _row_blocks(n: int, k: int) -> list[slice]:
    step = max(1, ROWS_PER_CHUNK_ELEMENTS // max(k, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _nonzero(s: torch.Tensor) -> torch.Tensor:
    """``s`` with zeros replaced by 1, for dividing: a constant row or group quantizes to its exact value."""
    return torch.where(s == 0, torch.ones_like(s), s)
