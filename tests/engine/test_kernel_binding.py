"""The runner's per-weight choice for quantized weights (engine/kernels.py): the native kernel, or its twin that
sends prompt-sized batches through a bfloat16 GEMM where the CPU runs that on AMX, never under --deterministic."""

from __future__ import annotations

import pytest
import torch

from falconlm.engine.fused_decode import fused_decoder
from falconlm.engine.kernels import bind_weight_kernels, quantized_prompt_path
from falconlm.native import ops
from falconlm.quant import load_quantized
from falconlm.quant.kernels.native import NATIVE_GEMM_KERNEL, NATIVE_KERNEL
from falconlm.quant.linear import QuantizedLinear

from ..conftest import make_hf_checkpoint, needs_native

pytestmark = needs_native


def _kernels(model: torch.nn.Module) -> set[str]:
    return {m.kernel.name for m in model.modules() if isinstance(m, QuantizedLinear)}


@pytest.fixture(scope="module")
def seven(tmp_path_factory: pytest.TempPathFactory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("7b"), "7b", hidden_size=128)


def test_quantized_weights_take_the_gemm_twin_only_with_amx_and_not_when_deterministic(seven, monkeypatch) -> None:
    model = load_quantized(seven, quantize="int4", dtype=torch.bfloat16)
    assert _kernels(model) == {NATIVE_KERNEL.name}
    monkeypatch.setattr(ops, "bf16_matrix_hardware", lambda: True)
    bind_weight_kernels(model)
    assert _kernels(model) == {NATIVE_GEMM_KERNEL.name}
    assert fused_decoder(model.transformer) is not None  # decode steps read the same tiles
    assert "bfloat16 GEMM on AMX" in quantized_prompt_path()
    bind_weight_kernels(model, invariant=True)  # --deterministic: every row count through the native kernel
    assert _kernels(model) == {NATIVE_KERNEL.name}
    monkeypatch.setattr(ops, "bf16_matrix_hardware", lambda: False)
    bind_weight_kernels(model)
    assert _kernels(model) == {NATIVE_KERNEL.name}
    assert "int8 dot products" in quantized_prompt_path()


def test_float32_activations_and_other_kernels_keep_theirs(seven, monkeypatch) -> None:
    monkeypatch.setattr(ops, "bf16_matrix_hardware", lambda: True)
    float32 = load_quantized(seven, quantize="int8", dtype=torch.float32)
    bind_weight_kernels(float32)
    assert _kernels(float32) == {NATIVE_KERNEL.name}
    reference = load_quantized(seven, quantize="int8", dtype=torch.bfloat16, kernel="reference")
    bind_weight_kernels(reference)
    assert _kernels(reference) == {"reference"}
