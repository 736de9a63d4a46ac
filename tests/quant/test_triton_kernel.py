"""The Triton int4 kernel against the dequantized reference, on CPU tensors under TRITON_INTERPRET=1."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from falconlm.quant.kernels import WeightSpec, select_kernel
from falconlm.quant.primitives import plan_groups, quantize_int4

# triton reads TRITON_INTERPRET when it decorates its own library functions, at import: set it first.
_IMPORTED_BEFORE = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ.setdefault("TRITON_INTERPRET", "1")
try:
    import triton  # noqa: F401
except ImportError:
    pytest.skip("triton is not installed (pip install 'falconlm[triton]')", allow_module_level=True)
if _IMPORTED_BEFORE or os.environ["TRITON_INTERPRET"] != "1":
    pytest.skip("triton was loaded without TRITON_INTERPRET=1; run this file on its own", allow_module_level=True)

# The interpreter does not support bfloat16 (triton-lang/triton#11584: it multiplies the raw bit patterns),
# so the CPU run checks float32 and float16; on a GPU the same kernel runs bfloat16 too.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3}


@pytest.fixture(autouse=True)
def fresh_kernel() -> None:
    from falconlm.quant.kernels import triton as triton_kernel

    triton_kernel._compiled.cache_clear()  # decorated again at first use, under the interpreter


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(
    ("m", "n", "k", "group"),
    [(1, 64, 128, 32), (5, 96, 4544, 128), (20, 50, 100, 64), (17, 16, 256, 128)],
)
def test_triton_int4_matches_reference(m: int, n: int, k: int, group: int, symmetric: bool, dtype: torch.dtype):
    torch.manual_seed(m + n + k)
    qt = quantize_int4(torch.randn(n, k) * 0.05, plan_groups(k, group), symmetric)
    spec = WeightSpec.of(qt)
    kernel = select_kernel(spec, "cpu", "triton")
    x = torch.randn(m, k).to(dtype)
    y = kernel.matmul(x, tuple(kernel.prepare(qt, dtype).values()), spec)
    ref = x.float() @ qt.dequantize().T
    assert y.dtype == dtype and y.shape == (m, n)
    assert ((y.float() - ref).abs().max() / ref.abs().max()) < TOLERANCE[dtype]


def test_triton_is_not_chosen_on_cpu_without_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    spec = WeightSpec.of(quantize_int4(torch.randn(16, 64), plan_groups(64, 32)))
    with pytest.raises(ValueError, match="cannot run"):
        select_kernel(spec, "cpu", "triton")
    assert select_kernel(spec, "cpu").name in ("native", "cpu")
