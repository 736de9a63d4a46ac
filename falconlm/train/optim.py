"""Optimisation setup: AdamW with weight-decay groups, and the learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices (Linear and Embedding weights) decay; biases and LayerNorms do not.

    ``named_parameters`` lists a tied weight once, so the tied embedding/head is in one group only.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; fused kernels on CUDA."""
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused or None)


@dataclass(frozen=True)
class CosineSchedule:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_lr`` at ``total`` steps.

    Steps are 0-based: the lr of the first update is ``lr / warmup`` (or ``lr`` with no warmup).
    """

    lr: float
    min_lr: float
    warmup: int
    total: int

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        decay_steps = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / decay_steps)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
