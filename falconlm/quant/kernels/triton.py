"""A Triton int4 group-wise matmul for GPUs: ``y = x @ ((q - 8) * scale + zero).T`` without a bf16 weight.

It reads the stored format directly (``qweight`` uint8 [N, K / 2], ``scales``/``zeros`` [N, G]), so a layer
and a tied embedding share one copy. Each program owns a [BLOCK_M, BLOCK_N] tile of ``y`` and walks K one group
at a time: it loads the group's packed bytes, splits the nibbles, applies that group's scale and zero point in
registers and accumulates ``tl.dot`` in float32. Importing this module needs ``triton`` (the ``triton``
extra); ``TRITON_INTERPRET=1`` runs the same kernel on CPU tensors, which is how the tests check it.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..primitives import QuantizedTensor
from . import WeightSpec, dequantize_stored


def _int4_matmul(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    y_ptr,
    M,
    N,
    K,
    num_groups,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_ym,
    HAS_ZEROS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, GROUP)
    offs_b = tl.arange(0, GROUP // 2)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, num_groups):
        k = g * GROUP + offs_g
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=mask_m[:, None] & (k[None, :] < K), other=0.0
        )
        b = tl.load(w_ptr + offs_n[:, None] * stride_wn + (g * (GROUP // 2) + offs_b)[None, :], mask=mask_n[:, None])
        q = tl.reshape(tl.join(b & 0xF, b >> 4), (BLOCK_N, GROUP))  # [BLOCK_N, GROUP]: k = 2j low, 2j + 1 high
        s = tl.load(s_ptr + offs_n * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)
        w = (q.to(tl.float32) - 8.0) * s[:, None]
        if HAS_ZEROS:
            z = tl.load(z_ptr + offs_n * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)
            w = w + z[:, None]
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y, mask=mask_m[:, None] & mask_n[None, :])


@functools.cache
def _compiled():  # decorated at first use, so TRITON_INTERPRET set by then is honoured
    return triton.jit(_int4_matmul)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def int4_matmul(
    x: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    spec: WeightSpec,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """``[M, K] @ W.T`` for one stored int4 weight (``qweight``, ``scales``, optional ``zeros``); ``block_n`` and
    ``num_warps`` are the tile's width and the warps per program (default :func:`tile_for`; the benchmarks sweep
    them)."""
    default_n, default_warps = tile_for(spec.out_features)
    block_n, num_warps = block_n or default_n, num_warps or default_warps
    qweight, scales = weights[0], weights[1]
    zeros = weights[2] if len(weights) > 2 else scales  # unused when HAS_ZEROS is false
    x2 = x.contiguous()
    m, n = x2.shape[0], spec.out_features
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = 16 if m <= 16 else 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _compiled()[grid](
        x2,
        qweight,
        scales,
        zeros,
        y,
        m,
        n,
        spec.in_features,
        spec.padded_in // spec.group_size,
        x2.stride(0),
        qweight.stride(0),
        scales.stride(0),
        y.stride(0),
        HAS_ZEROS=len(weights) > 2,
        GROUP=spec.group_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return y


def tile_for(out_features: int) -> tuple[int, int]:
    """(tile width, warps) for a weight of ``out_features`` rows. Measured on an H200 at one row, in two runs:
    16 columns and 2 warps took 5-63% less time than 64 and 4 on every bench-1b layer (2048-8192 rows, e.g.
    17.3 against 21.4 us at 2048 x 2048), and 64 columns won on the 65024-row head (62 against 72 us). It depends
    on the weight alone, never on the rows, so a row's sums do not depend on the batch."""
    return (16, 2) if out_features <= 16384 else (64, 4)


class TritonKernel:
    name = "triton"

    def supports(self, spec: WeightSpec, device: torch.device) -> bool:
        on_device = device.type == "cuda" or (device.type == "cpu" and interpreting())
        return spec.bits == 4 and on_device and spec.group_size >= 16

    def prepare(self, qt: QuantizedTensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out = {"qweight": qt.qweight.contiguous(), "scales": qt.scales.to(dtype).contiguous()}
        if qt.zeros is not None:
            out["zeros"] = qt.zeros.to(dtype).contiguous()
        return out

    def matmul(self, x: torch.Tensor, weights: tuple[torch.Tensor, ...], spec: WeightSpec) -> torch.Tensor:
        lead = x.shape[:-1]
        y = int4_matmul(x.reshape(-1, spec.in_features), weights, spec)
        return y.view(*lead, spec.out_features)

    def dequantize(self, weights: tuple[torch.Tensor, ...], spec: WeightSpec, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_stored(weights, spec, dtype)


TRITON_KERNEL = TritonKernel()
