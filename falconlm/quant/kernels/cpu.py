"""Fused dequantize-matmul on CPU through torch's packed-weight ops, which never materialise the bf16 weight.

* int8: ``aten._weight_int8pack_mm(x, q [N, K] int8, scales [N])``: the stored int8 matrix as it is. With
  bfloat16 activations this torch returns garbage or crashes when K is not a multiple of 16 (seen on AVX-512 with
  K = 8, 24, 100), so such widths go to the reference kernel.
* int4: ``aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros [G, N, 2])`` computes
  ``x @ ((q - 8) * scale + zero).T``, the stored format's formula; ``_convert_weight_to_int4pack_for_cpu``
  re-tiles the weight at load. It needs N a multiple of 16 and groups of 32, 64, 128 or 256; other shapes fall
  back to the reference kernel (:func:`falconlm.quant.kernels.select_kernel` asks :meth:`supports`).

Both take 2-D activations in float32, bfloat16 or float16, with scales in the activations' dtype. Chosen over
dequantize-then-matmul (4-15x slower at batch 1) and a torch.compile of it (2-8x slower); measured with
``benchmarks/bench_quant.py --matmul``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..primitives import QuantizedTensor, unpack_int4
from . import WeightSpec, dequantize_stored

INT4_N_MULTIPLE = 16
INT8_K_MULTIPLE = 16
PACK_ROWS = 1024  # a multiple of the 64-row tiles of torch's int4 CPU layout
DEQUANT_COLUMNS = 512  # columns per identity-matrix chunk when reading an int4 weight back
INT4_GROUP_SIZES = (32, 64, 128, 256)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class CpuKernel:
    name = "cpu"

    def supports(self, spec: WeightSpec, device: torch.device) -> bool:
        if device.type != "cpu":
            return False
        if spec.bits == 8:
            return hasattr(torch.ops.aten, "_weight_int8pack_mm") and spec.in_features % INT8_K_MULTIPLE == 0
        return (
            hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
            and spec.out_features % INT4_N_MULTIPLE == 0
            and spec.group_size in INT4_GROUP_SIZES
        )

    def prepare(self, qt: QuantizedTensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if dtype not in DTYPES:
            raise ValueError(f"the CPU quantized kernels take {DTYPES} activations, not {dtype}")
        if qt.bits == 8:
            return {"qweight": qt.qweight, "scales": qt.scales.to(dtype)}
        packed = torch.empty_like(qt.qweight)
        for start in range(0, qt.out_features, PACK_ROWS):  # bounded int32 temporaries; the layout tiles rows by 64
            rows = slice(start, start + PACK_ROWS)
            q = unpack_int4(qt.qweight[rows]).to(torch.int32)  # [rows, K] values 0..15
            packed[rows] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        zeros = qt.zeros if qt.zeros is not None else torch.zeros_like(qt.scales)
        scales_and_zeros = torch.stack([qt.scales, zeros], dim=-1).transpose(0, 1).contiguous()  # [G, N, 2]
        return {"qweight": packed, "scales_and_zeros": scales_and_zeros.to(dtype)}

    def matmul(self, x: torch.Tensor, weights: tuple[torch.Tensor, ...], spec: WeightSpec) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, spec.in_features)  # [M, K]
        if spec.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(x2, weights[0], weights[1])
        else:
            if spec.padded_in != spec.in_features:
                x2 = F.pad(x2, (0, spec.padded_in - spec.in_features))
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, weights[0], spec.group_size, weights[1])
        return y.view(*lead, spec.out_features)

    def dequantize(self, weights: tuple[torch.Tensor, ...], spec: WeightSpec, dtype: torch.dtype) -> torch.Tensor:
        if spec.bits == 8:
            return dequantize_stored(weights, spec, dtype)
        # The packed int4 layout is torch's own: read it back as identity-chunk @ W.T, a few columns at a time.
        parts = []
        for start in range(0, spec.in_features, DEQUANT_COLUMNS):
            n = min(DEQUANT_COLUMNS, spec.in_features - start)
            eye = torch.zeros(n, spec.in_features, dtype=dtype)
            eye[torch.arange(n), start + torch.arange(n)] = 1
            parts.append(self.matmul(eye, weights, spec).T)  # [N, n]
        return torch.cat(parts, dim=1)


CPU_KERNEL = CpuKernel()
