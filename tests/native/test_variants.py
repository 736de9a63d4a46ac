"""Every SIMD variant of the native kernels against the scalar reference, and batch invariance in every variant:
a row's result is bit for bit the same whatever other rows share the call."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest
import torch

import falconlm.quant.kernels.native as qnative
from falconlm import native
from falconlm.engine.fused_decode import fused_decoder
from falconlm.model.dense import KVCache, build_dense_attention
from falconlm.model.falcon import FalconForCausalLM
from falconlm.model.positions import rope_cos_sin
from falconlm.native import ops
from falconlm.quant import load_quantized
from falconlm.quant.kernels import WeightSpec
from falconlm.quant.kernels.native import NATIVE_KERNEL
from falconlm.quant.primitives import plan_groups, quantize_int4, quantize_int8

from ..conftest import make_hf_checkpoint, needs_native


def _quantized(bits: int, n: int = 96, k: int = 320):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(bits)) * 0.05
    qt = quantize_int8(w) if bits == 8 else quantize_int4(w, plan_groups(k, 64))
    spec = WeightSpec.of(qt)
    return spec, tuple(NATIVE_KERNEL.prepare(qt, torch.float32).values())


def _kernels(x_bf16: torch.Tensor, x_f32: torch.Tensor, w_bf16: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each kernel's output on the same inputs, in the variant now chosen."""
    out = {"bf16": ops.linear_invariant(x_bf16, w_bf16).float()}
    for bits in (8, 4):
        spec, weights = _quantized(bits)
        out[f"int{bits}"] = NATIVE_KERNEL.matmul(x_f32, weights, spec)
    return out


@pytest.mark.parametrize("rows", [13, 15])  # last blocks of 1 and 3 rows after 4-row blocks, 5 and 7 after 8
def test_simd_variants_match_the_scalar_reference(simd_isa: str, rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 320, generator=gen)
    w = (torch.randn(96, 320, generator=gen) * 0.05).bfloat16()
    simd = _kernels(x.bfloat16(), x, w)
    monkeypatch.setenv("FALCONLM_NATIVE_ISA", "scalar")
    scalar = _kernels(x.bfloat16(), x, w)
    # bfloat16 pair products (vdpbf16ps) round differently from float32 FMAs: within a bfloat16 ulp or so.
    torch.testing.assert_close(simd["bf16"], scalar["bf16"], rtol=8e-3, atol=1e-3)
    for bits in ("int8", "int4"):  # integer dot products are exact; the float steps are the same FMAs
        torch.testing.assert_close(simd[bits], scalar[bits], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 5])
def test_another_activation_block_width_gives_the_same_product(
    isa: str, rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiles take the 32-column activation block as a compile-time constant; any other width (64 here) runs the
    same code with the width read at run time: its products agree with the scalar reference's and, to the
    activations' int8 rounding, with the 32-column ones."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 320, generator=gen)
    for bits in (8, 4):
        spec, weights = _quantized(bits)
        usual = NATIVE_KERNEL.matmul(x, weights, spec)
        monkeypatch.setattr(qnative, "ACTIVATION_BLOCK", 64)
        wide = NATIVE_KERNEL.matmul(x, weights, spec)
        with monkeypatch.context() as m:
            m.setenv("FALCONLM_NATIVE_ISA", "scalar")
            reference = NATIVE_KERNEL.matmul(x, weights, spec)
        monkeypatch.setattr(qnative, "ACTIVATION_BLOCK", 32)
        torch.testing.assert_close(wide, reference, rtol=1e-6, atol=1e-6)
        assert not torch.equal(wide, usual)  # the width did reach the kernel
        torch.testing.assert_close(wide, usual, rtol=0, atol=0.02 * usual.abs().max().item())


@pytest.mark.parametrize("total", [3, 16, 40, 130])  # register-block remainders, and more rows than a block
def test_matmul_rows_do_not_depend_on_the_batch(isa: str, total: int) -> None:
    gen = torch.Generator().manual_seed(total)
    x = torch.randn(total, 320, generator=gen)
    # 101 bfloat16 weight rows: a lone row takes them in blocks of 8 on AVX2 (12 and a last 5), more rows in blocks
    # of 3 (33 and a last 2)
    w = (torch.randn(101, 320, generator=gen) * 0.05).bfloat16()
    batched = _kernels(x.bfloat16(), x, w)
    for i in (0, total // 2, total - 1):
        alone = _kernels(x[i : i + 1].bfloat16(), x[i : i + 1], w)
        for name, value in alone.items():
            assert torch.equal(value[0], batched[name][i]), f"{name} row {i} of {total}"


@pytest.mark.parametrize("alibi", [False, True])
def test_attention_rows_do_not_depend_on_the_batch(isa: str, alibi: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(32, 16, 2, 64, generator=gen).bfloat16()
    v = torch.randn(32, 16, 2, 64, generator=gen).bfloat16()
    q = torch.randn(5, 8, 64, generator=gen).bfloat16()
    tables = torch.stack([torch.randperm(32, generator=gen)[:8] for _ in range(5)])
    lens = torch.tensor([100, 3, 128, 17, 64])
    bias = None
    if alibi:  # a bias by key position and head, as ALiBi's table (16 padding columns)
        bias = torch.zeros(128, 8 + 16)
        bias[:, :8] = -torch.arange(128.0)[:, None] * torch.rand(8, generator=gen)
    batched = ops.decode_attention(q, k, v, tables, lens, 128, bias)
    assert batched is not None
    for i in range(5):
        alone = ops.decode_attention(q[i : i + 1], k, v, tables[i : i + 1].contiguous(), lens[i : i + 1], 128, bias)
        assert torch.equal(alone[0], batched[i])


@pytest.mark.parametrize("weights", ["bf16", "int4"])
def test_a_fused_decode_row_does_not_depend_on_the_batch(isa: str, tmp_path: Path, weights: str) -> None:
    """One row decoded alone, then beside two others (one long enough to be attended in parts): same logits."""
    checkpoint = make_hf_checkpoint(tmp_path / "7b", "7b", hidden_size=128, max_position_embeddings=700)
    if weights == "bf16":
        model = FalconForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    else:
        model = load_quantized(checkpoint, quantize="int4", dtype=torch.bfloat16)
    decoder = fused_decoder(model.transformer)
    assert decoder is not None
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (3, 600), generator=gen)
    token = torch.randint(0, model.config.vocab_size, (3, 1), generator=gen)

    def step(rows: int, prompt_len: int) -> torch.Tensor:
        cache = KVCache(model.config, rows, prompt_len + 1, torch.bfloat16)
        with torch.no_grad():
            model(prompts[:rows, :prompt_len], kv_cache=cache)
            x = model.transformer.word_embeddings(token[:rows])
            ctx = build_dense_attention(model.config, 1, None, cache, x.dtype, x.device, rows, 0.0)
            cos_sin = rope_cos_sin(model.config, torch.full((rows, 1), prompt_len), x.dtype)
            x = decoder(x, *cos_sin, ctx.decode_rows())
            return model.lm_head(x)[:, -1]  # the decoder's hidden states are after ln_f

    for prompt_len in (40, 600):  # one attention part, then two
        alone, batched = step(1, prompt_len), step(3, prompt_len)
        assert torch.equal(alone[0], batched[0]), f"prompt of {prompt_len}"


@needs_native
def test_the_engine_logs_which_variant_runs(tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture) -> None:
    from falconlm.engine.engine import Engine
    from falconlm.tokenizer import Tokenizer

    caplog.set_level("INFO", logger="falconlm.engine")
    Engine(FalconForCausalLM.from_pretrained(tiny_checkpoint), Tokenizer.from_pretrained(tiny_checkpoint))
    line = next(r.getMessage() for r in caplog.records if "native kernels" in r.getMessage())
    assert native.chosen_variant() in line and "scalar" in line  # the one that runs, and the others with why


def test_dtype_auto_says_what_it_picked(monkeypatch: pytest.MonkeyPatch) -> None:
    from falconlm.llm import auto_dtype, resolve_dtype

    if native.kernels() is not None:
        assert resolve_dtype("auto", "cpu") is torch.bfloat16
        assert "native" in auto_dtype(torch.device("cpu"))[1]
    monkeypatch.setenv("FALCONLM_NATIVE", "0")
    monkeypatch.setattr(ops, "bf16_hardware", lambda: False)
    dtype, why = auto_dtype(torch.device("cpu"))
    assert dtype is torch.float32 and "no native kernels" in why  # torch's bf16 GEMMs would be slower
    monkeypatch.setattr(ops, "bf16_hardware", lambda: True)
    assert auto_dtype(torch.device("cpu"))[0] is torch.bfloat16


@pytest.mark.parametrize(
    ("cap", "native_bf16"), [("AVX2", False), ("avx512_core_vnni", False), ("AVX512_CORE_AMX", None)]
)
def test_a_onednn_cap_below_bf16_turns_bf16_hardware_off(monkeypatch: pytest.MonkeyPatch, cap: str, native_bf16):
    # Under such a cap torch's bfloat16 GEMM cannot use the CPU's bfloat16 instructions, so prefill widens to float32.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    ops.bf16_hardware.cache_clear()
    try:
        expected = any(f in native.cpu_features() for f in ops.BF16_HARDWARE) if native_bf16 is None else native_bf16
        assert ops.bf16_hardware() is expected
    finally:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
        ops.bf16_hardware.cache_clear()


def test_the_weight_stream_is_requested_as_far_ahead_as_the_cpu_wants(isa: str) -> None:
    """The quantized matmuls request their weights 8192 bytes ahead into L2 and 6144 into L1 where AMD's cores were
    measured to want it (the AVX2 build on every CPU, the AVX-512 build on AMD or Hygon CPUs), else 4096 and 1024
    (quant_tiles.h). A prefetch changes no result, so only the library's own answer can show which it took."""
    out = (ctypes.c_int32 * 2)()
    native.kernels().falcon_stream_ahead(out)
    vendor = re.search(r"^vendor_id\s*:\s*(\S+)", Path("/proc/cpuinfo").read_text(), re.M)
    zen = vendor is not None and vendor.group(1) in ("AuthenticAMD", "HygonGenuine")
    far = isa.startswith("avx2") or (isa.startswith("avx512") and zen)
    assert tuple(out) == ((8192, 6144) if far else (4096, 1024))
