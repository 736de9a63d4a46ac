"""torch-facing wrappers of the native kernels, each falling back to torch where the kernel does not apply.

* :func:`linear`: ``F.linear(x, w)`` for bfloat16 weights on CPU: natively for few rows (decode steps); for more
  rows oneDNN's bfloat16 GEMM where the CPU computes in bfloat16, else float32 sums of widened values (the
  native panel GEMM on AVX2, a torch GEMM elsewhere);
* :func:`linear_invariant`: the same, natively for any number of rows, so that a row's result never depends
  on the others (``--deterministic``);
* :func:`argmax`: the last-dimension argmax of float32 / bfloat16 logits (torch's CPU argmax is scalar);
* :func:`decode_attention`: attention of one query position per row, read straight from a (paged) KV cache.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import chosen_family, cpu_features, kernels, threads_for

LINEAR_MAX_ROWS = 32  # above this, a GEMM that packs the weight once per call is faster than the native kernel
# The same for the AVX2 kernels against float32 GEMMs on widened weights (no bfloat16 arithmetic): 16-48 rows ran
# at 76-82 GMAC/s against 41-74 on the AVX2 stand-in (2 threads, K = 1024 and 4096), and the two met at 64.
AVX2_LINEAR_MAX_ROWS = 64
LINEAR_K_MULTIPLE = 32
BF16_HARDWARE = ("avx512_bf16", "amx_bf16")  # x86 CPUs whose GEMMs compute in bfloat16 at full speed
BF16_MATRIX_HARDWARE = "amx_bf16"  # x86 CPUs whose bfloat16 GEMMs run on matrix units (AMX tiles)
# oneDNN instruction-set caps (ONEDNN_MAX_CPU_ISA) below AVX512_CORE_BF16: under them torch's bfloat16 GEMM
# cannot use the CPU's bfloat16 arithmetic, whatever the CPU has.
ONEDNN_CAPS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")
BIAS_PAD = 16  # columns past the heads that decode attention's bias table holds: the kernel reads 16 heads at once
WIDEN_ROWS = 1024  # weight rows widened to float32 at a time where the CPU has no bfloat16 arithmetic
# Variants whose panel GEMM (bf16_panels.h) beats a float32 GEMM on widened weights for many rows. AVX2 stand-in,
# 2 threads, GMAC/s (widened / panels): 128 rows 92-98 / 101-108, 512 rows 97-105 / 101-107 (the 65024-row head
# at 512 rows slower: 95-98 / 88-91). Not on AVX-512, where MKL's float32 GEMM reached 104-163 against 96-120.
PANEL_VARIANTS = ("avx2",)


@functools.cache
def bf16_hardware() -> bool:
    """Whether torch's bfloat16 GEMM here multiplies bfloat16 natively (else it is slower than float32's): the
    CPU has the instructions, and oneDNN is not capped below them (``ONEDNN_MAX_CPU_ISA`` or ``DNNL_MAX_CPU_ISA``)."""
    if _onednn_cap() in ONEDNN_CAPS_WITHOUT_BF16:
        return False
    return any(f in cpu_features() for f in BF16_HARDWARE)


@functools.cache
def bf16_matrix_hardware() -> bool:
    """Whether torch's bfloat16 GEMM here runs on AMX tiles, at prompt-sized batches several times the rate of
    the int8 dot products: the CPU has them and oneDNN is not capped below them."""
    cap = _onednn_cap()
    if cap not in ("", "ALL", "DEFAULT") and "AMX" not in cap:
        return False
    return bf16_hardware() and BF16_MATRIX_HARDWARE in cpu_features()


def _onednn_cap() -> str:
    """oneDNN's instruction-set cap (``ONEDNN_MAX_CPU_ISA`` or ``DNNL_MAX_CPU_ISA``), upper case; "" for none."""
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` (no bias). bfloat16 on CPU: the native kernel up to native_max_rows() rows; above, oneDNN
    where the CPU has bfloat16 arithmetic, else float32 on widened copies. Anything else: ``F.linear``."""
    if not _native_fits(x, weight):
        return F.linear(x, weight)
    if x.numel() <= native_max_rows() * weight.shape[-1]:
        return _native_linear(x, weight)
    if bf16_hardware():
        return F.linear(x, weight)
    if prompt_panels():
        return panel_linear(x, weight)
    return _widened_linear(x, weight)


def prompt_panels() -> bool:
    """Whether :func:`linear` multiplies a prompt's many bfloat16 rows through the native panel GEMM here."""
    return chosen_family() in PANEL_VARIANTS and not bf16_hardware() and kernels() is not None


def native_max_rows() -> int:
    """Up to how many rows :func:`linear` multiplies bfloat16 natively rather than through a GEMM."""
    if chosen_family() == "avx2" and not bf16_hardware():
        return AVX2_LINEAR_MAX_ROWS
    return LINEAR_MAX_ROWS


def linear_invariant(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` with every bfloat16 CPU row through the native kernel, whose per-row sums run in one fixed
    order: row i of the result is the same whatever rows share the call. A width that is not a multiple of
    LINEAR_K_MULTIPLE (a small Falcon-Mamba's dt_proj) is padded with zeros, which add nothing to the sums, rather
    than left to torch, whose bfloat16 GEMM sums in an order that depends on the row count where the CPU has no
    bfloat16 arithmetic. Anything else: ``F.linear``."""
    if not _native_fits(x, weight, any_width=True):
        return F.linear(x, weight)
    pad = -weight.shape[-1] % LINEAR_K_MULTIPLE
    if pad:  # a copy of the weight per call: only small widths are not multiples of 32
        x, weight = F.pad(x, (0, pad)), F.pad(weight, (0, pad))
    return _native_linear(x, weight)


def panel_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for bfloat16 CPU tensors through the native panel GEMM: float32 sums,
    each output's products added in column order, one fused multiply-add at a time, on every variant alike."""
    return _native_linear(x, weight, kernels().falcon_gemm_bf16)


def _widened_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A float32 GEMM over widened copies, WIDEN_ROWS weight rows at a time (a few MB, not a float32 copy of a
    whole matrix), rounded back to bfloat16: on CPUs without bfloat16 arithmetic, torch's bfloat16 GEMM is several
    times slower than this."""
    x32 = x.float()
    y = x.new_empty(*x.shape[:-1], weight.shape[0])
    for n0 in range(0, weight.shape[0], WIDEN_ROWS):
        y[..., n0 : n0 + WIDEN_ROWS] = F.linear(x32, weight[n0 : n0 + WIDEN_ROWS].float())
    return y


def _native_fits(x: torch.Tensor, weight: torch.Tensor, any_width: bool = False) -> bool:
    """Whether the native kernel takes ``x @ weight.T``; ``any_width``: also a width that is not a multiple of
    LINEAR_K_MULTIPLE (the caller pads it)."""
    return not (
        x.dtype is not torch.bfloat16
        or weight.dtype is not torch.bfloat16
        or not x.is_cpu
        or (weight.shape[-1] % LINEAR_K_MULTIPLE and not any_width)
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        or not weight.is_contiguous()
        or kernels() is None
    )


def _native_linear(x: torch.Tensor, weight: torch.Tensor, kernel: Callable[..., None] | None = None) -> torch.Tensor:
    """``x @ weight.T`` through a native bfloat16 matmul: by default the row-dot kernel, whose rows never depend on
    each other (``falcon_linear_bf16``); or ``kernel``, another entry with its arguments."""
    if not x.is_contiguous():
        x = x.contiguous()
    n, k = weight.shape
    y = x.new_empty(*x.shape[:-1], n)
    rows = x.numel() // k
    (kernel or kernels().falcon_linear_bf16)(
        x.data_ptr(), rows, k, k, weight.data_ptr(), n, y.data_ptr(), threads_for(rows * n * k)
    )
    return y


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` (int64, first index of the largest value, NaN largest) for 2-D float32 / bfloat16 CPU
    tensors natively; anything else through torch."""
    if (
        x.dim() != 2
        or x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.bfloat16)
        or x.stride(1) != 1
        or (lib := kernels()) is None
    ):
        return x.argmax(-1)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    lib.falcon_argmax_rows(
        x.data_ptr(),
        int(x.dtype is torch.bfloat16),
        x.shape[0],
        x.shape[1],
        x.stride(0),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


ATTENTION_MAX_HEAD_DIM = 256


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_len: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """``softmax(q k^T / sqrt(d) + bias) v`` for one query position per row, reading K/V in place; None where the
    native kernel does not apply (the caller then attends with torch).

    ``q`` [R, Hq, d]; ``k``, ``v`` [blocks, block_size, G, d] views of the cache (any strides, d contiguous);
    row r's positions 0..context_lens[r]-1 live in blocks ``block_tables[r, 0], [r, 1], ...`` (both int64,
    contiguous); ``max_len`` is the largest context length (it sizes the threads' work).
    Query heads ``g * Hq / G ...`` read group g. Scores, softmax and sums in float32. ``bias`` (ALiBi) is float32
    [positions >= max_len, Hq + BIAS_PAD], contiguous: key position p's bias for each query head, then BIAS_PAD
    columns the kernel may read past the last head (zeros).
    """
    R, Hq, d = q.shape
    G = k.shape[2]
    if (
        q.dtype not in (torch.bfloat16, torch.float32)
        or k.dtype is not q.dtype
        or v.dtype is not q.dtype
        or not q.is_cpu
        or d % 16
        or d > ATTENTION_MAX_HEAD_DIM
        or Hq % G
        or k.stride() != v.stride()
        or k.stride(-1) != 1
        or block_tables.dtype is not torch.int64
        or context_lens.dtype is not torch.int64
        or not block_tables.is_contiguous()
        or not context_lens.is_contiguous()
        or (torch.is_grad_enabled() and q.requires_grad)
        or (bias is not None and not _bias_fits(bias, max_len, Hq))
        or (lib := kernels()) is None
    ):
        return None
    q = q.contiguous()
    out = torch.empty_like(q)
    lib.falcon_decode_attention(
        q.data_ptr(), int(q.dtype is torch.bfloat16), R, Hq, G, d, k.data_ptr(), v.data_ptr(), k.stride(0),
        k.stride(1), k.stride(2), k.shape[1], block_tables.data_ptr(), block_tables.stride(0),
        context_lens.data_ptr(), 1.0 / math.sqrt(d), out.data_ptr(), threads_for(R * Hq * d * max_len),
        None if bias is None else bias.data_ptr(), 0 if bias is None else bias.stride(0),
    )  # fmt: skip
    return out


def _bias_fits(bias: torch.Tensor, max_len: int, heads: int) -> bool:
    """Whether ``bias`` is a table :func:`decode_attention` can read: float32 on the CPU, contiguous, a row for
    every position up to ``max_len`` and BIAS_PAD columns past the heads."""
    return (
        bias.dtype is torch.float32
        and bias.is_cpu
        and bias.dim() == 2
        and bias.is_contiguous()
        and bias.shape[0] >= max_len
        and bias.shape[1] >= heads + BIAS_PAD
    )
