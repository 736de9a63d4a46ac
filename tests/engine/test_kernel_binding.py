"""The runner's per-weight choice for quantized weights (engine/kernels.py): the native kernel, or its twin that
sends prompt-sized batches through a bfloat16 GEMM where the CPU runs that on AMX, never under --deterministic."""

from __future__ import annotations

import json

import pytest
import torch

from falconlm import LLM, SamplingParams
from falconlm.engine.fused_decode import fused_decoder
from falconlm.engine.kernels import bind_weight_kernels, quantized_prompt_path
from falconlm.model.config import FalconConfig
from falconlm.model.falcon import FalconForCausalLM
from falconlm.native import ops
from falconlm.quant import QuantRecipe, load_quantized, quantize_model
from falconlm.quant.kernels.native import GEMM_MIN_ROWS, NATIVE_GEMM_KERNEL, NATIVE_KERNEL, NativeGemmKernel
from falconlm.quant.linear import QuantizedLinear

from ..conftest import make_hf_checkpoint, needs_native

pytestmark = needs_native


def _kernels(model: torch.nn.Module) -> set[str]:
    """The kernels of the quantized layer matrices (the output head is apart: see the head's test below)."""
    head = getattr(model, "lm_head", None)
    return {m.kernel.name for m in model.modules() if isinstance(m, QuantizedLinear) and m is not head}


@pytest.fixture(scope="module")
def seven(tmp_path_factory: pytest.TempPathFactory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("7b"), "7b", hidden_size=128, max_position_embeddings=512)


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


def test_deterministic_mode_dequantizes_what_the_native_kernel_cannot_take(seven) -> None:
    """A quantized matrix of a shape the native tiles cannot take (here 20 outputs) keeps a torch kernel, whose
    GEMM sums follow the row count on some CPUs; under --deterministic it becomes a FalconLinear over its
    dequantized weight and bias on the invariant matmul. The matrices on the native kernel stay as they are."""
    from falconlm.model.falcon import FalconLinear
    from falconlm.quant.kernels import WeightSpec, select_kernel
    from falconlm.quant.primitives import quantize_int8

    model = load_quantized(seven, quantize="int8", dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    qt = quantize_int8(torch.randn(20, 128, generator=gen) * 0.05)
    odd = QuantizedLinear(
        qt, torch.randn(20, generator=gen), torch.bfloat16, select_kernel(WeightSpec.of(qt), "cpu", "reference")
    )
    model.transformer.h[0].odd = odd
    x = torch.randn(7, 128, generator=gen).bfloat16()
    expected = odd(x).float()
    bind_weight_kernels(model)
    assert model.transformer.h[0].odd is odd  # default mode: as loaded
    bind_weight_kernels(model, invariant=True)
    plain = model.transformer.h[0].odd
    assert type(plain) is FalconLinear and plain.matmul is ops.linear_invariant
    assert _kernels(model) == {NATIVE_KERNEL.name}  # the others are untouched
    y = plain(x)
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)
    assert all(torch.equal(plain(x[r : r + 1]), y[r : r + 1]) for r in range(7))


def test_the_engine_sends_prompt_chunks_through_the_gemm_with_the_same_distribution(seven, monkeypatch) -> None:
    """A 200-token prompt goes through the GEMM twin (decode steps do not: they run fused), and its next-token
    distribution is the one the int8 dot products give, up to their activation rounding."""
    prompt = [(5 * j) % 90 + 1 for j in range(200)]
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, logprobs=5)

    def first_logprobs(amx: bool) -> dict[int, float]:
        monkeypatch.setattr(ops, "bf16_matrix_hardware", lambda: amx)
        out = LLM(seven, dtype="bfloat16", quantize="int8").generate([prompt], params)[0].outputs[0]
        assert len(out.token_ids) == 2
        return dict(out.logprobs[0].top)

    rows: list[int] = []
    gemm_matmul = NativeGemmKernel.matmul

    def counting(self, x, weights, spec):
        rows.append(x.numel() // spec.in_features)
        return gemm_matmul(self, x, weights, spec)

    monkeypatch.setattr(NativeGemmKernel, "matmul", counting)
    with_gemm = first_logprobs(True)
    assert rows and max(rows) >= GEMM_MIN_ROWS  # the prompt chunk reached the GEMM
    without = first_logprobs(False)
    shared = with_gemm.keys() & without.keys()
    assert len(shared) >= 4
    assert max(abs(with_gemm[t] - without[t]) for t in shared) < 0.05


@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_the_output_head_sums_each_row_alone_whatever_the_rows(seven, weights, monkeypatch) -> None:
    """A step's sampled rows go through the head together. Above 32 rows (64 on AVX2) ``ops.linear`` leaves the
    native kernel for a GEMM whose sums follow the row count, and with AMX a quantized weight's GEMM twin does so
    from GEMM_MIN_ROWS: the head keeps the invariant matmul, so a row's logits are the same bits alone or among
    many (the layer matrices keep their faster kernels). The head is Falcon's real size (65024 x 1024, random):
    over a small one a GEMM can happen to round every logit alike."""
    monkeypatch.setattr(ops, "bf16_matrix_hardware", lambda: True)  # the GEMM twin too, where it would apply
    raw = {**json.loads((seven / "config.json").read_text()), "vocab_size": 65024, "hidden_size": 1024}
    raw |= {"num_attention_heads": 16, "num_hidden_layers": 1}
    torch.manual_seed(0)
    model = FalconForCausalLM(FalconConfig.from_dict(raw)).to(torch.bfloat16).eval()
    if weights != "bfloat16":
        model = quantize_model(model, QuantRecipe.parse(weights))
    bind_weight_kernels(model)
    layer = model.transformer.h[0].mlp.dense_h_to_4h
    assert getattr(layer, "matmul", None) is ops.linear or layer.kernel is NATIVE_GEMM_KERNEL
    rows = GEMM_MIN_ROWS + 8
    hidden = torch.randn(rows, 1024, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.inference_mode():
        together = model.compute_logits(hidden)
        alone = torch.cat([model.compute_logits(hidden[i : i + 1]) for i in range(rows)])
    assert torch.equal(together, alone)
