"""The engine's kernel choices, made in two places only: per weight when the runner takes a model (which
matmul each bfloat16 weight uses, and whether a quantized weight's prompt batches go through a bfloat16 GEMM),
and per step (the fused decode step or the model's torch forward, see ``runner.py``). Quantized weights chose
their kernel when they were loaded (``falconlm.quant.kernels``); the runner may only swap the native one for
its GEMM-backed twin, which reads the same tiles.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from .. import native
from ..model.falcon import FalconForCausalLM, FalconLinear
from ..model.paged_attention import RowAttention
from ..native import ops
from ..quant.kernels.native import GEMM_MIN_ROWS, NATIVE_GEMM_KERNEL, NATIVE_KERNEL
from ..quant.linear import QuantizedLinear
from .huge_pages import move_to_huge_pages

log = logging.getLogger("falconlm.engine")


def bind_weight_kernels(model: FalconForCausalLM, invariant: bool = False) -> int:
    """Give every bfloat16 CPU ``FalconLinear`` of ``model`` the native matmul (built now, not in the first
    request), the batch-invariant one for every row count when ``invariant``; returns how many weights took it.
    Unless ``invariant``, on CPUs whose bfloat16 GEMMs run on AMX, each quantized weight on the native kernel
    with bfloat16 activations takes NATIVE_GEMM_KERNEL: its prompt batches then go through that GEMM.
    The output head (``lm_head``) always takes the invariant matmul (or stays on NATIVE_KERNEL): its rows are the
    step's sampled tokens, whose logits must not follow how many other rows share the step (above 32 rows, or 64
    on AVX2, ``ops.linear`` leaves the native kernel for a GEMM that sums in another order).
    A plain bfloat16 ``nn.Linear`` (a Mamba model's head) first becomes a FalconLinear over the same parameters;
    when ``invariant``, so does each bfloat16 quantized matrix the native kernel cannot take (over its dequantized
    weight, see :func:`_dequantize_odd_shapes`). Large CPU weights first move to transparent huge pages
    (``huge_pages.py``), kernels or not. Without the native kernels nothing else changes."""
    move_to_huge_pages(model)
    if native.kernels() is None:
        return 0
    _plain_linears_as_falcon(model)
    if invariant:
        _dequantize_odd_shapes(model)
    bound = 0
    prompt_gemm = not invariant and ops.bf16_matrix_hardware()
    head = getattr(model, "lm_head", None)
    for module in model.modules():
        if isinstance(module, FalconLinear) and module.weight.dtype is torch.bfloat16 and module.weight.is_cpu:
            module.matmul = ops.linear_invariant if invariant or module is head else ops.linear
            bound += 1
        if isinstance(module, QuantizedLinear) and module.kernel in (NATIVE_KERNEL, NATIVE_GEMM_KERNEL):
            gemm = prompt_gemm and module.compute_dtype is torch.bfloat16 and module is not head
            module.kernel = NATIVE_GEMM_KERNEL if gemm else NATIVE_KERNEL
    return bound


def _dequantize_odd_shapes(model: torch.nn.Module) -> None:
    """Swap each bfloat16 CPU QuantizedLinear whose shape the native kernel cannot take (in practice the odd
    widths of small test models, as real Falcon widths fit its tiles) for a FalconLinear over its dequantized weight
    and bias, which then takes the invariant native matmul. Its own kernel would go through torch's quantized or
    bfloat16 GEMMs, whose sums follow the row count on some CPUs (oneDNN without bfloat16 arithmetic). A weight
    the native kernel could take but that was given another kernel by name stays as it was chosen."""

    def dequantized(child: torch.nn.Module) -> FalconLinear | None:
        if not isinstance(child, QuantizedLinear) or child.compute_dtype is not torch.bfloat16:
            return None
        device = next(child.buffers()).device
        if device.type != "cpu" or NATIVE_KERNEL.supports(child.spec, device):  # native, or could be
            return None
        return _falcon_linear(torch.nn.Parameter(child.weight.contiguous(), requires_grad=False), child.bias)

    if swapped := _swap_children(model, dequantized):
        log.info("deterministic: %d quantized matrices the native kernel cannot take run dequantized", swapped)


def _plain_linears_as_falcon(model: torch.nn.Module) -> None:
    """Swap each bias-free bfloat16 CPU module of type exactly ``nn.Linear`` for a FalconLinear holding the same
    weight object (so a tied head stays tied); without a bias the two compute the same thing."""

    def falcon(child: torch.nn.Module) -> FalconLinear | None:
        plain = type(child) is torch.nn.Linear and child.bias is None
        if plain and child.weight.dtype is torch.bfloat16 and child.weight.is_cpu:
            return _falcon_linear(child.weight, None)
        return None

    _swap_children(model, falcon)


def _swap_children(model: torch.nn.Module, replace: Callable[[torch.nn.Module], torch.nn.Module | None]) -> int:
    """Put ``replace(child)`` in place of every submodule of ``model`` for which it is not None; returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (new := replace(child)) is not None:
                setattr(parent, name, new)
                swapped += 1
    return swapped


def _falcon_linear(weight: torch.nn.Parameter, bias: torch.nn.Parameter | None) -> FalconLinear:
    """A FalconLinear holding these very parameters (nothing allocated for others first)."""
    out_features, in_features = weight.shape
    linear = FalconLinear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight, linear.bias = weight, bias
    return linear


def row_attention(device: torch.device) -> RowAttention | None:
    """The kernel for one-query-per-row attention over the paged cache on ``device``, or None for SDPA."""
    return ops.decode_attention if device.type == "cpu" and native.kernels() is not None else None


def log_choice() -> None:
    """One log line: which native variant runs, and why the others do not."""
    log.info("%s; %s; %s", native.describe(), quantized_prompt_path(), bf16_prompt_path())


def quantized_prompt_path() -> str:
    """What the native kernel's quantized weights do with prompt-sized batches here (see bind_weight_kernels)."""
    if ops.bf16_matrix_hardware():
        return f"quantized prompt batches of {GEMM_MIN_ROWS}+ rows: bfloat16 GEMM on AMX (not with --deterministic)"
    return (
        "quantized prompt chunks: int8 dot products (no AMX bfloat16 GEMM here), in the fused step where it applies, "
        "a row per token"
    )


def bf16_prompt_path() -> str:
    """What bfloat16 weights do with prompt chunks here (the runner and ``FusedDecoder.takes_prompts``)."""
    if ops.bf16_hardware():
        return "bfloat16 prompt chunks: torch's bfloat16 GEMM (the CPU's bfloat16 arithmetic)"
    if ops.prompt_panels():
        return (
            "bfloat16 prompt chunks: the fused step where it applies, a row per token, over widened weight panels "
            "(not with --deterministic)"
        )
    return "bfloat16 prompt chunks: float32 GEMM on widened weights"
