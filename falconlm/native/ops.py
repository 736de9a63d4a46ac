"""torch-facing wrappers of the native kernels, each falling back to torch where the kernel does not apply.

* :func:`linear`: ``F.linear(x, w)`` for bfloat16 on CPU with few rows (decode steps) through vdpbf16ps;
* :func:`argmax`: the last-dimension argmax of float32 / bfloat16 logits (torch's CPU argmax is scalar).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import library

LINEAR_MAX_ROWS = 32  # above this, oneDNN's GEMM (which packs the weight once per call) is as fast or faster
LINEAR_K_MULTIPLE = 32


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` (no bias), natively when x and weight are bfloat16 on CPU, x has at most
    LINEAR_MAX_ROWS rows, the width is a multiple of 32 and no gradient is wanted; else ``F.linear``."""
    k = weight.shape[-1]
    if (
        x.dtype is not torch.bfloat16
        or weight.dtype is not torch.bfloat16
        or x.device.type != "cpu"
        or k % LINEAR_K_MULTIPLE
        or x.numel() > LINEAR_MAX_ROWS * k
        or not weight.is_contiguous()
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        or (lib := library("bf16_gemm")) is None
    ):
        return F.linear(x, weight)
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    n = weight.shape[0]
    y = torch.empty(x2.shape[0], n, dtype=torch.bfloat16)
    lib.falcon_linear_bf16(
        x2.data_ptr(), x2.shape[0], k, x2.stride(0), weight.data_ptr(), n, y.data_ptr(), torch.get_num_threads()
    )
    return y.view(*x.shape[:-1], n)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` (int64, first index of the largest value, NaN largest) for 2-D float32 / bfloat16 CPU
    tensors natively; anything else through torch."""
    if (
        x.dim() != 2
        or x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.bfloat16)
        or x.stride(1) != 1
        or (lib := library("bf16_gemm")) is None
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
