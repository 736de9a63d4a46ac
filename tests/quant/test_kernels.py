"""Quantized matmul kernels against the dequantized reference, per dtype, on ordinary and awkward shapes."""

from __future__ import annotations

import pytest
import torch

from falconlm.quant.kernels import WeightSpec, select_kernel
from falconlm.quant.linear import QuantizedEmbedding, QuantizedLinear
from falconlm.quant.primitives import QuantizedTensor, plan_groups, quantize_int4, quantize_int8

# Max |kernel - reference| relative to max |reference|: the kernels round activations and scales to the dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
SHAPES = [  # (out_features, in_features, group size asked for)
    (96, 64, 32),
    (64, 4544, 128),  # Falcon-7B's hidden size as the input width: groups of 64
    (4544, 256, 64),  # ... and as the output width
    (48, 100, 64),  # nothing divides: padded input, N not a multiple of 16
    (40, 192, 128),  # groups of 64, N not a multiple of 16
]


def quantized(n: int, k: int, bits: int, group: int = 64, symmetric: bool = False) -> QuantizedTensor:
    torch.manual_seed(n * 7 + k)
    w = torch.randn(n, k) * 0.05
    return quantize_int8(w) if bits == 8 else quantize_int4(w, plan_groups(k, group), symmetric)


def check(y: torch.Tensor, x: torch.Tensor, qt: QuantizedTensor, dtype: torch.dtype) -> None:
    ref = x.float() @ qt.dequantize().T
    assert y.dtype == dtype and y.shape == ref.shape
    err = (y.float() - ref).abs().max() / ref.abs().max()
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(("n", "k", "group"), SHAPES)
@pytest.mark.parametrize("kernel", ["auto", "reference"])
def test_kernel_matches_reference(kernel: str, n: int, k: int, group: int, bits: int, dtype: torch.dtype) -> None:
    qt = quantized(n, k, bits, group)
    spec = WeightSpec.of(qt)
    chosen = select_kernel(spec, "cpu", kernel)
    x = torch.randn(3, k).to(dtype)
    y = chosen.matmul(x, tuple(chosen.prepare(qt, dtype).values()), spec)
    check(y, x, qt, dtype)


def test_auto_picks_the_fused_cpu_kernel_where_it_can() -> None:
    assert select_kernel(WeightSpec.of(quantized(96, 64, 4, 32)), "cpu").name == "cpu"
    assert select_kernel(WeightSpec.of(quantized(40, 64, 8)), "cpu").name == "cpu"
    # torch's int4 CPU op needs N % 16 == 0, its bf16 int8 op K % 16 == 0: the reference runs the rest.
    assert select_kernel(WeightSpec.of(quantized(40, 64, 4, 32)), "cpu").name == "reference"
    assert select_kernel(WeightSpec.of(quantized(40, 100, 8)), "cpu").name == "reference"


def test_select_kernel_errors() -> None:
    spec = WeightSpec.of(quantized(40, 64, 4, 32))
    with pytest.raises(ValueError, match="unknown quantized kernel 'fast'"):
        select_kernel(spec, "cpu", "fast")
    with pytest.raises(ValueError, match="kernel 'cpu' cannot run this weight"):
        select_kernel(spec, "cpu", "cpu")


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_linear_adds_bias_over_leading_dims(bits: int) -> None:
    qt = quantized(64, 128, bits, 32)
    bias = torch.randn(64)
    layer = QuantizedLinear(qt, bias, torch.float32, select_kernel(WeightSpec.of(qt), "cpu"))
    x = torch.randn(2, 5, 128)
    expected = x @ qt.dequantize().T + bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.weight, qt.dequantize(), rtol=1e-5, atol=1e-6)
    assert f"bits={bits}" in repr(layer) and "kernel=cpu" in repr(layer)
    assert not layer.state_dict().keys() - {"bias"}  # kernel layouts are not a storage format


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_embedding_gathers_dequantized_rows(bits: int) -> None:
    qt = quantized(80, 64, bits, 32)
    emb = QuantizedEmbedding(qt.to(dtype=torch.bfloat16), torch.bfloat16)
    ids = torch.tensor([[1, 79, 1]])
    out = emb(ids)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 3, 64)
    torch.testing.assert_close(out.float(), qt.dequantize()[ids], rtol=1e-2, atol=1e-3)
    assert emb.weight.shape == (80, 64)
