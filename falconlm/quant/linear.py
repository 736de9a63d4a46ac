"""Modules that replace ``nn.Linear`` / ``nn.Embedding`` once weights are quantized.

Each keeps the tensors it reads as buffers (so ``.to()`` moves them). :class:`QuantizedLinear` calls the kernel
chosen for it at construction; the bias, like FalconLinear's, is added after the matmul as a separate op.
A tied embedding and head share the stored tensors whenever the head's kernel reads the stored format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import Kernel, WeightSpec
from .primitives import QuantizedTensor


class QuantizedLinear(nn.Module):
    """``y = x @ W.T (+ bias)`` with W held as int8 per channel or int4 per group, computed by ``kernel``."""

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None, dtype: torch.dtype, kernel: Kernel) -> None:
        super().__init__()
        self.spec = WeightSpec.of(qt)
        self.in_features, self.out_features = qt.in_features, qt.out_features
        self.compute_dtype = dtype
        self.kernel = kernel
        self._names: list[str] = []
        for name, t in kernel.prepare(qt, dtype).items():
            self.register_buffer(name, t, persistent=False)
            self._names.append(name)
        self.bias = None if bias is None else nn.Parameter(bias.to(qt.qweight.device, dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernel.matmul(x, tuple(self._buffers[n] for n in self._names), self.spec)
        return y if self.bias is None else y + self.bias

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized [out, in] matrix in the compute dtype, materialised on every access: for the dtype
        or device alone, read a LayerNorm's weight instead."""
        return self.kernel.dequantize(tuple(self._buffers[n] for n in self._names), self.spec, self.compute_dtype)

    def extra_repr(self) -> str:
        group = f", group_size={self.spec.group_size}" if self.spec.bits == 4 else ""
        pad = f", padded_in={self.spec.padded_in}" if self.spec.padded_in != self.in_features else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.spec.bits}{group}{pad}, "
            f"bias={self.bias is not None}, kernel={self.kernel.name}"
        )


class QuantizedEmbedding(nn.Module):
    """Looks up rows of a quantized [vocab, hidden] matrix and dequantizes only those.

    With ``head`` (a tied lm_head whose kernel can read single rows back, see ``Kernel.rows``) the embedding
    holds the head's own tensors, in that kernel's layout, instead of a second copy of the matrix.
    """

    def __init__(self, qt: QuantizedTensor, dtype: torch.dtype, head: QuantizedLinear | None = None) -> None:
        super().__init__()
        self.bits, self.group_size, self.compute_dtype = qt.bits, qt.group_size, dtype
        self.num_embeddings, self.embedding_dim = qt.out_features, qt.in_features
        self.head_kernel = head.kernel if head is not None and hasattr(head.kernel, "rows") else None
        if self.head_kernel is not None:
            self.spec = head.spec
            self._names = list(head._names)
            for name in self._names:
                self.register_buffer(name, head._buffers[name], persistent=False)
            return
        self.register_buffer("qweight", qt.qweight, persistent=False)
        self.register_buffer("scales", qt.scales.to(dtype), persistent=False)
        self.register_buffer("zeros", None if qt.zeros is None else qt.zeros.to(dtype), persistent=False)

    def stored(self) -> QuantizedTensor:
        """The stored matrix, scales in the compute dtype (not available when reading a head's layout)."""
        if self.head_kernel is not None:
            raise AttributeError("this embedding reads its tied head's kernel layout, not the stored format")
        return QuantizedTensor(self.bits, self.embedding_dim, self.group_size, self.qweight, self.scales, self.zeros)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.head_kernel is not None:
            weights = tuple(self._buffers[n] for n in self._names)
            return self.head_kernel.rows(weights, ids, self.spec, self.compute_dtype)
        if self.bits == 8:  # the common case, kept to two gathers and one multiply
            return F.embedding(ids, self.qweight).to(self.compute_dtype) * F.embedding(ids, self.scales[:, None])
        return self.stored().rows(ids, self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized [vocab, hidden] matrix, materialised on every access."""
        if self.head_kernel is not None:
            weights = tuple(self._buffers[n] for n in self._names)
            return self.head_kernel.dequantize(weights, self.spec, self.compute_dtype)
        return self.stored().dequantize(self.compute_dtype)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        tied = f", layout={self.head_kernel.name}" if self.head_kernel is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}{group}{tied}"
