"""RMS normalisation, as Llama, Falcon3, Falcon-Mamba and Falcon-H1 compute it.

``rms(x)`` divides by the root mean square of the last axis in float32 and casts back to ``x``'s dtype before any
weight is applied; :class:`RMSNorm` multiplies by a learned per-channel weight after that cast.
"""

from __future__ import annotations

import torch
from torch import nn


def rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation without a weight, computed in float32, back in ``x``'s dtype."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, the statistics in float32 and cast back before the weight."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * rms(x, self.eps)
