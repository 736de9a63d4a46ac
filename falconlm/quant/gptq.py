"""GPTQ (Frantar et al., 2022): int4 rounding that compensates each column's error on calibration activations.

Round-to-nearest quantizes every weight on its own. GPTQ quantizes one input column at a time and spreads that
column's rounding error over the columns not yet quantized, weighted by the inverse Hessian ``H = 2 X^T X`` of
the layer's calibration inputs X, so that ``X W^T`` (what the layer computes) moves as little as possible. The
group scales and zero points are chosen when a group's first column is reached, from the weights as updated so
far. The result is stored in exactly the int4 format of :mod:`falconlm.quant.primitives`: only the rounding
differs, so every loader and kernel reads it unchanged.

:func:`gptq_quantize` handles one matrix given its Hessian; :func:`calibrate_blocks` walks the decoder blocks in
order, collecting each block's input Hessians from calibration text with the earlier blocks already quantized
(what the next block will really see).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..model.dense import build_dense_attention
from ..model.falcon import FalconForCausalLM
from ..model.positions import rope_cos_sin
from .primitives import GroupPlan, QuantizedTensor, pack_int4

BLOCK_COLUMNS = 128  # columns updated together before the lazy update of the rest (the paper's B)
DAMPING = 0.01  # fraction of the mean Hessian diagonal added to it, for a stable Cholesky factorisation
BODY_LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, plan: GroupPlan, symmetric: bool = False) -> QuantizedTensor:
    """Quantize ``w`` [N, K] to int4 groups by GPTQ, with ``hessian`` [K, K] from the layer's inputs."""
    n, k = w.shape
    if k != plan.in_features or tuple(hessian.shape) != (k, k):
        raise ValueError(f"expected a [N, {plan.in_features}] matrix and a [{k}, {k}] Hessian")
    W = w.to(torch.float32).clone()
    H = hessian.to(torch.float32).clone()
    if plan.padded_in > k:  # padded columns meet zero activations: they never move the output
        pad = plan.padded_in - k
        W = torch.cat([W, W[:, -1:].expand(-1, pad)], dim=1)
        H = torch.block_diag(H, torch.zeros(pad, pad))
        k = plan.padded_in
    dead = torch.diagonal(H) == 0  # inputs that were always zero: any value is exact
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(DAMPING * torch.diagonal(H).mean())
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    g = plan.group_size
    q = torch.empty(n, k, dtype=torch.uint8)
    scales = torch.empty(n, k // g)
    zeros = None if symmetric else torch.empty(n, k // g)
    for start in range(0, k, BLOCK_COLUMNS):
        stop = min(start + BLOCK_COLUMNS, k)
        block = W[:, start:stop].clone()
        errors = torch.empty_like(block)
        inv = h_inv[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            if col % g == 0:  # a new group: its grid from the weights as they stand now
                s, z = _group_grid(torch.cat([block[:, i:], W[:, stop:]], dim=1)[:, :g], symmetric)
                scales[:, col // g] = s
                if zeros is not None:
                    zeros[:, col // g] = z
            column = block[:, i]
            codes = _round(column, s, z, symmetric)
            q[:, col] = codes
            err = (column - _value(codes, s, z, symmetric)) / inv[i, i]
            block[:, i:] -= err[:, None] * inv[i, i:][None, :]
            errors[:, i] = err
        W[:, stop:] -= errors @ h_inv[start:stop, stop:]
    return QuantizedTensor(4, plan.in_features, g, pack_int4(q), scales, zeros)


def _group_grid(group: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of one group [N, g], exactly as :func:`~falconlm.quant.primitives.quantize_int4`
    sets them (a constant group keeps scale 0 and is stored exactly)."""
    if symmetric:
        idx = group.abs().argmax(dim=1, keepdim=True)
        s = group.gather(1, idx).squeeze(1) / -8.0
        return s, torch.zeros_like(s)
    lo, hi = group.amin(dim=1), group.amax(dim=1)
    s = (hi - lo) / 15.0
    return s, lo + 8.0 * s


def _round(column: torch.Tensor, s: torch.Tensor, z: torch.Tensor, symmetric: bool) -> torch.Tensor:
    step = torch.where(s == 0, torch.ones_like(s), s)
    base = column / step if symmetric else (column - (z - 8.0 * s)) / step
    return (base.round() + (8 if symmetric else 0)).clamp(0, 15).to(torch.uint8)


def _value(codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor, symmetric: bool) -> torch.Tensor:
    return s * (codes.float() - 8.0) + (0.0 if symmetric else z)


@torch.no_grad()
def calibrate_blocks(
    model: FalconForCausalLM,
    calibration: torch.Tensor,
    quantize: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor],
    progress: Callable[[int], None] | None = None,
) -> None:
    """Run ``calibration`` [S, T] token ids through the decoder blocks one block at a time.

    For each block, the inputs of its four matrices give their Hessians; ``quantize(name, weight, hessian)``
    returns the dequantized weight that replaces each (so the block's output, fed to the next block, is the
    quantized model's). The model is changed in place; ``progress(1)`` is called after each block.
    """
    config = model.config
    transformer = model.transformer
    dtype = transformer.ln_f.weight.dtype
    samples, length = calibration.shape
    hidden = transformer.word_embeddings(calibration).to(dtype)  # [S, T, H]
    rope = None
    if config.rotary:
        positions = torch.arange(length).expand(samples, length)
        rope = rope_cos_sin(config, positions, dtype)
    ctx = build_dense_attention(config, length, None, None, dtype, hidden.device, samples)
    for index, block in enumerate(transformer.h):
        linears = {name: block.get_submodule(name) for name in BODY_LINEARS}
        hessians = {name: torch.zeros(m.in_features, m.in_features) for name, m in linears.items()}
        handles = [m.register_forward_hook(_accumulate(hessians[name])) for name, m in linears.items()]
        try:
            block(hidden, rope, ctx)
        finally:
            for handle in handles:
                handle.remove()
        for name, module in linears.items():
            count = samples * length
            weight = quantize(f"transformer.h.{index}.{name}", module.weight, hessians[name] * (2.0 / count))
            module.weight = nn.Parameter(weight.to(module.weight.dtype), requires_grad=False)
        hidden = block(hidden, rope, ctx)
        if progress is not None:
            progress(1)


def _accumulate(hessian: torch.Tensor) -> Callable:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float32)
        hessian.addmm_(x.T, x)

    return hook


def calibration_ids(tokens: torch.Tensor, samples: int, length: int, seed: int = 0) -> torch.Tensor:
    """``samples`` windows of ``length`` token ids [samples, length] drawn (seeded) from a 1-D token stream."""
    if samples < 1 or length < 2:
        raise ValueError(f"calibration needs at least 1 sample of 2 tokens, got {samples} of {length}")
    if tokens.numel() < length:
        raise ValueError(f"the calibration text has {tokens.numel()} tokens, fewer than one window of {length}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - length + 1, (samples,), generator=gen)
    return torch.stack([tokens[s : s + length] for s in starts.tolist()])
