"""Quantized matmul kernels behind one signature, and the choice of one per weight, made once at load.

A kernel turns a :class:`QuantizedTensor` into the tensors it reads (``prepare``, at load) and computes
``x @ W.T`` from them (``matmul``, every step). Kernels:

* ``native``: int8-activation dot products on every CPU (``falconlm.native``), see ``native.py``;
* ``cpu``: torch's fused CPU ops (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``), see ``cpu.py``;
* ``triton``: a Triton int4 group-wise matmul for GPUs, see ``triton.py``;
* ``reference``: dequantize, then a plain matmul; any device, any shape. Tests compare the others against it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from ...native import unavailable_reason
from ..primitives import QuantizedTensor, dequantize_int4, unpack_int4

KERNEL_NAMES = ("auto", "native", "cpu", "triton", "reference")
ALIASES = {"vnni": "native"}  # the native kernel's name when it ran on AVX-512 VNNI only


@dataclass(frozen=True)
class WeightSpec:
    """The shape facts a kernel needs besides the tensors."""

    bits: int
    in_features: int
    out_features: int
    group_size: int  # 0 for int8
    padded_in: int

    @classmethod
    def of(cls, qt: QuantizedTensor) -> WeightSpec:
        return cls(qt.bits, qt.in_features, qt.out_features, qt.group_size, qt.padded_in)


class Kernel(Protocol):
    name: str

    def supports(self, spec: WeightSpec, device: torch.device) -> bool:
        """Whether this kernel can run ``spec`` on ``device``."""
        ...

    def prepare(self, qt: QuantizedTensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The tensors ``matmul`` reads, from ``qt`` already on its device; ``dtype`` is the activations'."""
        ...

    def matmul(self, x: torch.Tensor, weights: tuple[torch.Tensor, ...], spec: WeightSpec) -> torch.Tensor:
        """``x`` [..., in_features] -> [..., out_features] in x's dtype."""
        ...

    def dequantize(self, weights: tuple[torch.Tensor, ...], spec: WeightSpec, dtype: torch.dtype) -> torch.Tensor:
        """The [out_features, in_features] matrix that ``matmul`` multiplies by, in ``dtype``."""
        ...

    # Optional: ``rows(weights, ids, spec, dtype)``, dequantized rows ``ids`` -> [*ids.shape, in_features].
    # A kernel with its own layout offers it, so that a tied embedding can read the head's tensors.


class ReferenceKernel:
    """Dequantize the whole matrix in the activations' dtype every call, then ``F.linear``."""

    name = "reference"

    def supports(self, spec: WeightSpec, device: torch.device) -> bool:
        return True

    def prepare(self, qt: QuantizedTensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out = {"qweight": qt.qweight, "scales": qt.scales.to(dtype)}
        if qt.zeros is not None:
            out["zeros"] = qt.zeros.to(dtype)
        return out

    def matmul(self, x: torch.Tensor, weights: tuple[torch.Tensor, ...], spec: WeightSpec) -> torch.Tensor:
        return F.linear(x, dequantize_stored(weights, spec, x.dtype))

    def dequantize(self, weights: tuple[torch.Tensor, ...], spec: WeightSpec, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_stored(weights, spec, dtype)


def dequantize_stored(weights: tuple[torch.Tensor, ...], spec: WeightSpec, dtype: torch.dtype) -> torch.Tensor:
    """[N, in_features] in ``dtype`` from the stored layout (qweight, scales[, zeros]), scales already in the
    compute dtype: int8 in that dtype, int4 through float32."""
    q, scales = weights[0], weights[1]
    if spec.bits == 8:
        return q.to(dtype) * scales.to(dtype)[:, None]
    zeros = weights[2] if len(weights) > 2 else None
    return dequantize_int4(unpack_int4(q), scales, zeros, spec.group_size)[:, : spec.in_features].to(dtype)


def select_kernel(spec: WeightSpec, device: torch.device | str, name: str | None = None) -> Kernel:
    """The kernel for one weight: ``name`` if given (ValueError when it cannot run it), else the fastest that
    can: Triton for int4 on CUDA; on CPU the native kernel, then torch's fused ops; the reference otherwise."""
    device = torch.device(device)
    name = name or os.environ.get("FALCONLM_QUANT_KERNEL") or "auto"
    name = ALIASES.get(name, name)
    if name not in KERNEL_NAMES:
        raise ValueError(f"unknown quantized kernel {name!r}; choose one of {KERNEL_NAMES}")
    if name != "auto":
        kernel = _kernel(name)
        if kernel is None or not kernel.supports(spec, device):
            why = "triton is not installed" if kernel is None else f"int{spec.bits} {_shape(spec)} on {device.type}"
            if name == "native" and (native := unavailable_reason()) is not None:
                why = native
            raise ValueError(f"quantized kernel {name!r} cannot run this weight ({why})")
        return kernel
    order = ("triton", "cpu", "reference") if device.type == "cuda" else ("native", "cpu", "reference")
    for candidate in order:
        kernel = _kernel(candidate)
        if kernel is not None and kernel.supports(spec, device):
            return kernel
    raise AssertionError("the reference kernel supports everything")


def _kernel(name: str) -> Kernel | None:
    if name == "reference":
        return _REFERENCE
    if name == "cpu":
        from .cpu import CPU_KERNEL

        return CPU_KERNEL
    if name == "native":
        from .native import NATIVE_KERNEL

        return NATIVE_KERNEL
    try:
        from .triton import TRITON_KERNEL
    except ImportError:
        return None
    return TRITON_KERNEL


def _shape(spec: WeightSpec) -> str:
    group = f", groups of {spec.group_size}" if spec.group_size else ""
    return f"[{spec.out_features}, {spec.in_features}]{group}"


_REFERENCE = ReferenceKernel()
