"""Quantized matmul kernels against the dequantized reference, per dtype, on ordinary and awkward shapes."""

from __future__ import annotations

import pytest
import torch

from falconlm import native
from falconlm.quant.kernels import WeightSpec, select_kernel
from falconlm.quant.kernels import native as native_kernel
from falconlm.quant.kernels.native import NATIVE_GEMM_KERNEL, NATIVE_KERNEL
from falconlm.quant.linear import QuantizedEmbedding, QuantizedLinear
from falconlm.quant.primitives import QuantizedTensor, plan_groups, quantize_int4, quantize_int8

from ..conftest import RUNNABLE, needs_native

# Max |kernel - reference| relative to max |reference|: the kernels round activations and scales to the dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
NATIVE_TOLERANCE = 2e-2  # the native kernel also rounds activations to int8, in blocks of 32
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


def check(y: torch.Tensor, x: torch.Tensor, qt: QuantizedTensor, dtype: torch.dtype, kernel: str = "") -> None:
    ref = x.float() @ qt.dequantize().T
    assert y.dtype == dtype and y.shape == ref.shape
    err = (y.float() - ref).abs().max() / ref.abs().max()
    tolerance = max(TOLERANCE[dtype], NATIVE_TOLERANCE) if kernel == "native" else TOLERANCE[dtype]
    assert err < tolerance, f"relative error {err:.2e}"


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
    check(y, x, qt, dtype, chosen.name)


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("rows", [1, 5, 70])  # register blocks of 4 rows and their remainders; 64-row blocks
@pytest.mark.parametrize(
    ("n", "k", "bits", "group"),
    [(96, 64, 8, 0), (64, 4544, 8, 0), (4544, 256, 4, 64), (48, 100, 4, 64), (32, 256, 4, 32), (32, 512, 4, 128)],
)
def test_native_kernel_matches_reference(
    isa: str, n: int, k: int, bits: int, group: int, rows: int, dtype: torch.dtype
) -> None:
    qt = quantized(n, k, bits, group or 64, symmetric=group == 32)
    spec = WeightSpec.of(qt)
    kernel = select_kernel(spec, "cpu", "native")
    weights = tuple(kernel.prepare(qt, dtype).values())
    x = torch.randn(rows, 2, k).to(dtype)[:, 1]  # rows a stride apart
    check(kernel.matmul(x, weights, spec), x, qt, dtype, "native")
    assert torch.equal(kernel.matmul(torch.zeros(2, k, dtype=dtype), weights, spec), torch.zeros(2, n, dtype=dtype))
    # The tiled layout reads back to the stored matrix: exactly for int8, through bfloat16 scales for int4.
    exact = bits == 8
    torch.testing.assert_close(
        kernel.dequantize(weights, spec, torch.float32), qt.dequantize(), rtol=0 if exact else 1e-2,
        atol=0 if exact else 1e-3,
    )  # fmt: skip


def test_auto_picks_the_fastest_cpu_kernel_that_can_run() -> None:
    fast = "native" if RUNNABLE else "cpu"
    assert select_kernel(WeightSpec.of(quantized(96, 64, 4, 32)), "cpu").name == fast
    assert select_kernel(WeightSpec.of(quantized(48, 64, 8)), "cpu").name == fast
    # The native kernel and torch's int4 CPU op need N % 16 == 0; torch's bf16 int8 op needs K % 16 == 0 and the
    # native one K % 32 == 0: the others fall back.
    assert select_kernel(WeightSpec.of(quantized(40, 64, 4, 32)), "cpu").name == "reference"
    assert select_kernel(WeightSpec.of(quantized(40, 64, 8)), "cpu").name == "cpu"
    assert select_kernel(WeightSpec.of(quantized(40, 100, 8)), "cpu").name == "reference"


def test_select_kernel_errors() -> None:
    spec = WeightSpec.of(quantized(40, 64, 4, 32))
    with pytest.raises(ValueError, match="unknown quantized kernel 'fast'"):
        select_kernel(spec, "cpu", "fast")
    with pytest.raises(ValueError, match="kernel 'cpu' cannot run this weight"):
        select_kernel(spec, "cpu", "cpu")
    with pytest.raises(ValueError, match="kernel 'native' cannot run this weight"):
        select_kernel(spec, "cpu", "native")


def test_forcing_native_without_native_kernels_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FALCONLM_NATIVE", "0")
    with pytest.raises(ValueError, match="FALCONLM_NATIVE is off"):
        select_kernel(WeightSpec.of(quantized(32, 64, 8)), "cpu", "native")
    assert select_kernel(WeightSpec.of(quantized(32, 64, 8)), "cpu").name == "cpu"


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_linear_adds_bias_over_leading_dims(bits: int) -> None:
    qt = quantized(64, 128, bits, 32)
    bias = torch.randn(64)
    layer = QuantizedLinear(qt, bias, torch.float32, select_kernel(WeightSpec.of(qt), "cpu", "cpu"))
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


@pytest.mark.parametrize("bits", [8, 4])
def test_embedding_tied_to_a_native_head_reads_its_tensors(isa: str, bits: int) -> None:
    qt = quantized(64, 128, bits, 32).to(dtype=torch.float32)
    head = QuantizedLinear(qt, None, torch.float32, select_kernel(WeightSpec.of(qt), "cpu", "native"))
    emb = QuantizedEmbedding(qt, torch.float32, head)
    assert emb.qweight.data_ptr() == head.qweight.data_ptr()  # one copy of the matrix
    ids = torch.tensor([[0, 17, 63], [16, 15, 31]])
    tol = {"rtol": 0, "atol": 0} if bits == 8 else {"rtol": 1e-2, "atol": 1e-3}  # int4 scales are bfloat16
    torch.testing.assert_close(emb(ids), qt.dequantize()[ids], **tol)
    assert "layout=native" in repr(emb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k", "bits", "group"), [(64, 128, 8, 0), (4544, 256, 4, 64), (48, 100, 4, 64)])
def test_native_rows_equal_the_torch_dequantization(isa: str, n: int, k: int, bits: int, group: int, dtype) -> None:
    """The embedding's one-call row lookup gives the bits of the torch ops it replaces, padded widths too."""
    qt = quantized(n, k, bits, group or 64)
    spec = WeightSpec.of(qt)
    kernel = select_kernel(spec, "cpu", "native")
    weights = tuple(kernel.prepare(qt, dtype).values())
    ids = torch.tensor([[0, n - 1, 17], [16, 15, n // 2]])
    rows = kernel.rows(weights, ids, spec, dtype)
    assert rows.dtype == dtype and rows.shape == (2, 3, k)
    assert torch.equal(rows, kernel.torch_rows(weights, ids, spec, dtype))
    torch.testing.assert_close(rows.float(), qt.dequantize()[ids], rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize(
    ("n", "k", "bits", "group"),
    [(64, 128, 8, 0), (96, 4544, 8, 0), (4544, 256, 4, 64), (48, 100, 4, 64), (32, 256, 4, 32)],
)
def test_native_transposed_dequantization_equals_the_torch_one(isa: str, n: int, k: int, bits: int, group: int) -> None:
    """The GEMM kernel's strips are the bits of the torch dequantization, transposed: whole, from an offset, and
    over padded widths (the activation-block padding is not written)."""
    qt = quantized(n, k, bits, group or 64)
    spec = WeightSpec.of(qt)
    weights = tuple(NATIVE_KERNEL.prepare(qt, torch.bfloat16).values())
    reference = NATIVE_KERNEL.torch_rows(weights, torch.arange(n), spec, torch.bfloat16)
    for n0, width in [(0, n), (16, n - 32)]:
        out = torch.full((k, width), float("nan"), dtype=torch.bfloat16)
        native.kernels().falcon_qdequant_t(
            weights[0].data_ptr(), weights[1].data_ptr(), bits, spec.padded_in, k, spec.group_size, n0, width,
            out.data_ptr(), 2,
        )  # fmt: skip
        assert torch.equal(out.T, reference[n0 : n0 + width])


@pytest.mark.parametrize("bits", [8, 4])
def test_native_transposed_dequantization_keeps_denormal_values(isa: str, bits: int) -> None:
    """Rows whose scales (and int4 zeros) are denormal floats dequantize to denormals, which the AVX-512 BF16
    pair conversion would flush to zero: their bits are still the torch ones, next to ordinary rows."""
    n, k = 64, 128
    qt = quantized(n, k, bits, 64)
    tiny = torch.tensor(3e-39).to(qt.scales.dtype)  # a float32 denormal, also one in bfloat16
    qt.scales[16:40] = tiny
    if qt.zeros is not None:
        qt.zeros[16:40] = -tiny
    spec = WeightSpec.of(qt)
    weights = tuple(NATIVE_KERNEL.prepare(qt, torch.bfloat16).values())
    reference = NATIVE_KERNEL.torch_rows(weights, torch.arange(n), spec, torch.bfloat16)
    denormal = (reference != 0) & (reference.float().abs() < torch.finfo(torch.float32).tiny)
    assert denormal[16:40].any() and not denormal[:16].any()
    out = torch.empty(k, n, dtype=torch.bfloat16)
    native.kernels().falcon_qdequant_t(
        weights[0].data_ptr(), weights[1].data_ptr(), bits, spec.padded_in, k, spec.group_size, 0, n,
        out.data_ptr(), 2,
    )  # fmt: skip
    assert torch.equal(out.T, reference)


@needs_native
@pytest.mark.parametrize("bits", [8, 4])
def test_native_gemm_kernel_takes_the_gemm_from_its_threshold(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Below GEMM_MIN_ROWS rows the GEMM kernel is the native one, bit for bit; from it (in strips, here several
    per matrix) it is a bfloat16 GEMM over the dequantized weight; float32 activations never take the GEMM."""
    monkeypatch.setattr(native_kernel, "STRIP_BYTES", 64 * 256 * 2)  # 64-row strips of a 256-wide matrix
    qt = quantized(4544, 256, bits, 64)
    spec = WeightSpec.of(qt)
    weights = tuple(NATIVE_KERNEL.prepare(qt, torch.bfloat16).values())
    dequantized = NATIVE_KERNEL.dequantize(weights, spec, torch.bfloat16)
    few = torch.randn(1, native_kernel.GEMM_MIN_ROWS - 1, 256).bfloat16()
    assert torch.equal(NATIVE_GEMM_KERNEL.matmul(few, weights, spec), NATIVE_KERNEL.matmul(few, weights, spec))
    many = torch.randn(2, native_kernel.GEMM_MIN_ROWS // 2, 256).bfloat16()  # the rows of every batch count
    y = NATIVE_GEMM_KERNEL.matmul(many, weights, spec)
    assert y.shape == (2, native_kernel.GEMM_MIN_ROWS // 2, 4544) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, many @ dequantized.T, rtol=1e-2, atol=1e-2)
    assert not torch.equal(y, NATIVE_KERNEL.matmul(many, weights, spec))  # the int8 activations are gone
    check(y.view(-1, 4544), many.view(-1, 256), qt, torch.bfloat16)  # as close to the reference as any kernel
    many32 = many.float()
    assert torch.equal(NATIVE_GEMM_KERNEL.matmul(many32, weights, spec), NATIVE_KERNEL.matmul(many32, weights, spec))
