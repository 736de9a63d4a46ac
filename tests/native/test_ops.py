"""The native CPU kernels against torch, in every variant this CPU runs: bfloat16 matmuls, argmax, decode
attention, and the build cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from falconlm import native
from falconlm.native import ops

from ..conftest import needs_native, torch_threads


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 13, 16, 22, 32])  # every remainder of the 8-row blocks
@pytest.mark.parametrize(("n", "k"), [(1, 32), (5, 64), (67, 1024), (256, 4544 - 4544 % 32)])
def test_linear_matches_float32_reference(isa: str, rows: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(rows * 1000 + n)
    x = torch.randn(2, rows, k, generator=gen).bfloat16()[1]  # a view whose storage starts past zero
    w = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
    y = ops.linear(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    ref = x.float() @ w.float().T
    # float32 accumulation, rounded once to bfloat16: within a bfloat16 ulp of the exact value.
    torch.testing.assert_close(y.float(), ref, rtol=8e-3, atol=1e-3)


def test_linear_keeps_leading_dims_and_non_contiguous_rows(isa: str) -> None:
    x = torch.randn(2, 3, 128).bfloat16()
    w = torch.randn(40, 128).bfloat16()
    torch.testing.assert_close(ops.linear(x, w).float(), F.linear(x, w).float(), rtol=8e-3, atol=2e-2)
    strided = torch.randn(4, 256).bfloat16()[:, ::2]  # last-dim stride 2: copied, not misread
    torch.testing.assert_close(ops.linear(strided, w).float(), F.linear(strided, w).float(), rtol=8e-3, atol=2e-2)


@pytest.mark.parametrize("k", [6, 16, 40])
def test_linear_invariant_pads_any_width(isa: str, k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Widths that are not multiples of 32 (a small Falcon-Mamba's dt_proj) still go through the native kernel,
    padded with zeros, not through torch: each row is the same bits alone as among others, and as F.linear's up to
    rounding."""
    monkeypatch.setattr(F, "linear", None)  # torch's matmul would fail here
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(9, k, generator=gen).bfloat16()
    w = (torch.randn(24, k, generator=gen) * 0.3).bfloat16()
    y = ops.linear_invariant(x, w)
    assert y.shape == (9, 24) and y.dtype == torch.bfloat16
    for r in (0, 4, 8):
        assert torch.equal(ops.linear_invariant(x[r : r + 1], w), y[r : r + 1])
    torch.testing.assert_close(y.float(), x.float() @ w.float().T, rtol=8e-3, atol=1e-3)


def test_linear_falls_back_to_torch_outside_its_case(monkeypatch: pytest.MonkeyPatch) -> None:
    w = torch.randn(8, 48)
    for x, weight in [
        (torch.randn(2, 48), w),  # float32
        (torch.randn(2, 48).bfloat16(), w.bfloat16()),  # K not a multiple of 32
    ]:
        assert torch.equal(ops.linear(x, weight), F.linear(x, weight))
    many = torch.randn(ops.native_max_rows() + 1, 64).bfloat16(), torch.randn(8, 64).bfloat16()
    if ops.bf16_hardware():
        assert torch.equal(ops.linear(*many), F.linear(*many))  # many rows: torch's bfloat16 GEMM
    monkeypatch.setattr(ops, "bf16_hardware", lambda: False)
    monkeypatch.setattr(ops, "PANEL_VARIANTS", ())  # no panel GEMM: torch's float32 GEMM on widened weights,
    monkeypatch.setattr(ops, "WIDEN_ROWS", 3)  # widened three weight rows at a time
    widened = F.linear(*(t.float() for t in many))
    torch.testing.assert_close(ops.linear(*many).float(), widened, rtol=8e-3, atol=1e-3)  # one bf16 rounding
    x, weight = torch.randn(2, 64, requires_grad=True), torch.randn(8, 64)
    y = ops.linear(x.bfloat16(), weight.bfloat16())
    y.float().sum().backward()  # autograd still flows: the native path never runs with gradients wanted
    assert x.grad is not None
    monkeypatch.setenv("FALCONLM_NATIVE", "0")
    assert native.kernels() is None
    xb, wb = torch.randn(2, 64).bfloat16(), torch.randn(8, 64).bfloat16()
    assert torch.equal(ops.linear(xb, wb), F.linear(xb, wb))


def test_the_read_probe_sums_every_word(isa: str) -> None:
    words = torch.randint(0, 1 << 40, (100_003,), generator=torch.Generator().manual_seed(3))  # odd: uneven parts
    expected = int(words.sum()) % (1 << 64)
    for threads in (1, 2, 3):
        assert native.kernels().falcon_read_words(words.data_ptr(), words.numel(), threads) == expected


def test_the_fma_probe_runs_every_chain_on_every_thread(isa: str) -> None:
    lib = native.kernels()
    chains = lib.falcon_fma_probe_chains()
    assert chains >= 6
    for threads in (1, 2, 3):
        starts = threads * 16 * chains * (chains + 1) / 2  # chains start at 1, 2, ... on 16 lanes per thread
        assert lib.falcon_fma_probe(1000, 1.0, 0.0, threads) == starts
        assert lib.falcon_fma_probe(1000, 1.0, 1.0, threads) == starts + threads * 16 * chains * 1000
        assert lib.falcon_fma_probe(3, 2.0, 0.0, threads) == starts * 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_equals_torch_with_ties_infinities_and_nan(isa: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 65024 + 5, generator=gen)
    x[1, 100] = x[1, 40000] = 50.0  # a tie: the first index wins
    x[2] = float("-inf")
    x[3, 7] = float("inf")
    x[4, 123] = float("nan")  # NaN is the largest, as in torch
    x[5, -1] = 99.0  # in the tail past the last 16-lane chunk
    x = x.to(dtype)
    assert torch.equal(ops.argmax(x), x.argmax(-1))
    assert torch.equal(ops.argmax(x[:, :-5]), x[:, :-5].argmax(-1))  # rows a stride apart
    assert torch.equal(ops.argmax(x[:1, :3]), x[:1, :3].argmax(-1))


def test_unavailable_reason_names_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FALCONLM_NATIVE", "off")
    assert native.unavailable_reason() == "FALCONLM_NATIVE is off"
    assert native.kernels() is None
    monkeypatch.setenv("FALCONLM_NATIVE", "1")
    monkeypatch.setenv("FALCONLM_NATIVE_ISA", "sse9")
    assert "unknown variant 'sse9'" in native.unavailable_reason()
    with pytest.warns(UserWarning, match="FALCONLM_NATIVE_ISA=sse9: unknown variant"):  # said once, not silently
        assert native.kernels() is None
    monkeypatch.setenv("FALCONLM_NATIVE_ISA", "neon" if native.machine() == "x86_64" else "avx2")
    assert native.unavailable_reason().startswith("not an")
    with pytest.warns(UserWarning, match="not an"):
        assert native.kernels() is None


def test_base_builds_leave_the_optional_features_out(monkeypatch: pytest.MonkeyPatch) -> None:
    zen3 = frozenset({"avx2", "fma", "f16c"})
    zen4 = zen3 | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni"}
    monkeypatch.setattr(native, "machine", lambda: "x86_64")
    monkeypatch.setattr(native, "cpu_features", lambda: zen4)
    monkeypatch.setattr(native, "_compiler", lambda: "g++")  # status() builds nothing: any compiler name will do
    monkeypatch.delenv("FALCONLM_NATIVE", raising=False)
    assert native.runnable_variants() == ["avx512", "avx2", "scalar"]
    assert native.runnable_variants(with_base=True) == ["avx512", "avx512-base", "avx2", "avx2-base", "scalar"]
    monkeypatch.setattr(native, "cpu_features", lambda: zen3)  # nothing optional: a base build would be the same
    assert native.runnable_variants(with_base=True) == ["avx2", "scalar"]
    assert native.variant_unavailable("avx512-base") == "the CPU lacks avx512f, avx512bw, avx512vl"
    assert "or one of them + '-base'" in native.variant_unavailable("sse9-base")
    avx2 = next(v for v in native.VARIANTS if v.name == "avx2")
    assert "-mavxvnni" in native.build_command(avx2, "g++", zen4)
    assert "-mavxvnni" not in native.build_command(avx2, "g++", frozenset())  # what avx2-base builds with
    monkeypatch.setenv("FALCONLM_NATIVE_ISA", "avx2-base")
    monkeypatch.setattr(native, "cpu_features", lambda: zen4)
    assert native.status()["chosen"] == "avx2-base"  # no "(with avx_vnni)": the base build does not use it


def test_a_stand_in_is_new_ground_only_where_it_runs_another_build(monkeypatch: pytest.MonkeyPatch) -> None:
    zen3 = frozenset({"avx2", "fma", "f16c"})
    skylake = zen3 | {"avx512f", "avx512bw", "avx512vl"}
    zen4 = skylake | {"avx512_vnni", "avx512_bf16"}
    monkeypatch.setattr(native, "machine", lambda: "x86_64")
    cases = {  # CPU: the stand-ins .ci/run would run
        zen3: [],
        skylake: ["avx2-base"],
        zen4: ["avx512-base", "avx2-base"],
        zen4 | {"avx_vnni"}: ["avx512-base", "avx2-base"],
    }
    for features, stand_ins in cases.items():
        monkeypatch.setattr(native, "cpu_features", lambda features=features: features)
        assert [v for v in ("avx512-base", "avx2-base", "neon-base") if native.new_ground(v)] == stand_ins
        assert not native.new_ground(native.runnable_variants()[0])  # the default choice itself
        assert native.new_ground("scalar")


@needs_native
def test_a_build_is_reused_and_a_failed_build_leaves_nothing(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FALCONLM_CACHE_DIR", str(tmp_path))
    spec = next(v for v in native.VARIANTS if v.name == "scalar")
    first = native._build(spec)
    assert first.parent == tmp_path / "native" and first.is_file()
    stamp = first.stat().st_mtime_ns
    assert native._build(spec) == first and first.stat().st_mtime_ns == stamp  # not compiled again
    broken = native.Variant("scalar", None, (), ("-fno-such-flag-for-falconlm",))
    with pytest.raises(OSError, match="failed"):
        native._build(broken)
    assert sorted(p.name for p in (tmp_path / "native").iterdir()) == [first.name]  # no stray temporaries


def _reference_attention(q, k, v, tables, lens):
    """Per row: gather its positions through its block table, then SDPA in float32 (query heads by group)."""
    R, Hq, d = q.shape
    G, block = k.shape[2], k.shape[1]
    out = torch.empty(R, Hq, d)
    for r in range(R):
        n = int(lens[r])
        blocks = tables[r, : -(-n // block)]
        keys = k[blocks].reshape(-1, G, d)[:n].float().transpose(0, 1)  # [G, n, d]
        values = v[blocks].reshape(-1, G, d)[:n].float().transpose(0, 1)
        queries = q[r].float().view(G, Hq // G, d)
        out[r] = F.scaled_dot_product_attention(queries, keys, values).reshape(Hq, d)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "groups", "head_dim", "block"),
    [(16, 1, 64, 16), (8, 2, 64, 16), (71, 1, 64, 4), (4, 4, 128, 8), (32, 8, 16, 16)],
)
def test_decode_attention_matches_sdpa_through_block_tables(
    isa: str, dtype: torch.dtype, heads: int, groups: int, head_dim: int, block: int
) -> None:
    gen = torch.Generator().manual_seed(heads + head_dim)
    num_blocks = 64
    k = torch.randn(num_blocks, block, groups, head_dim, generator=gen).to(dtype)
    v = torch.randn(num_blocks, block, groups, head_dim, generator=gen).to(dtype)
    lens = torch.tensor([1, 7, 16, 61])
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:16] for _ in lens])  # scattered blocks
    q = torch.randn(len(lens), heads, head_dim, generator=gen).to(dtype)
    out = ops.decode_attention(q, k, v, tables, lens, int(lens.max()))
    assert out is not None and out.dtype == dtype and out.shape == q.shape
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(out.float(), _reference_attention(q, k, v, tables, lens), **tol)


@pytest.mark.parametrize(("heads", "groups"), [(8, 1), (32, 4)])
def test_decode_attention_adds_a_bias_by_position_and_head(isa: str, heads: int, groups: int) -> None:
    # ALiBi's form: a bias for each key position and query head, added to the scaled scores (float32 cache).
    gen = torch.Generator().manual_seed(heads)
    d, block, num_blocks = 64, 16, 16
    k = torch.randn(num_blocks, block, groups, d, generator=gen)
    v = torch.randn(num_blocks, block, groups, d, generator=gen)
    lens = torch.tensor([1, 19, 40])
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:4] for _ in lens])
    q = torch.randn(len(lens), heads, d, generator=gen)
    bias = torch.zeros(48, heads + 16)
    bias[:, :heads] = torch.randn(48, heads, generator=gen) * 3
    out = ops.decode_attention(q, k, v, tables, lens, int(lens.max()), bias)
    assert out is not None
    for r, n in enumerate(lens.tolist()):
        keys = k[tables[r]].reshape(-1, groups, d)[:n]  # [n, G, d]
        values = v[tables[r]].reshape(-1, groups, d)[:n]
        for h in range(heads):
            g = h // (heads // groups)
            weights = torch.softmax(keys[:, g] @ q[r, h] / d**0.5 + bias[:n, h], dim=0)
            torch.testing.assert_close(out[r, h], weights @ values[:, g], rtol=1e-5, atol=1e-5)
    unpadded = bias[:, :heads].contiguous()  # the kernel reads 16 heads at a time: it needs the padding
    assert ops.decode_attention(q, k, v, tables, lens, int(lens.max()), unpadded) is None
    assert ops.decode_attention(q, k, v, tables, lens, int(lens.max()), bias[:39]) is None  # too few positions


def test_decode_attention_declines_what_it_cannot_run() -> None:
    q, k = torch.randn(1, 4, 64), torch.randn(4, 16, 2, 64)
    tables, lens = torch.zeros(1, 1, dtype=torch.int64), torch.tensor([3])
    assert ops.decode_attention(q.half(), k.half(), k.half(), tables, lens, 3) is None  # float16
    assert ops.decode_attention(q[..., :40], k[..., :40], k[..., :40], tables, lens, 3) is None  # d % 16
    assert ops.decode_attention(q, k, k, tables.int(), lens, 3) is None  # int32 tables
    assert ops.decode_attention(q[:, :3], k, k, tables, lens, 3) is None  # heads not a multiple of groups


# Rows: 6-row blocks and every remainder, and 300 (two chunks of up to 256 rows). (N, K): a partial panel, more
# panels than a group of 32, a 256-column block with a tail (4544 = 17 x 256 + 192).
@pytest.mark.parametrize("rows", [1, 5, 6, 13, 300])
@pytest.mark.parametrize(("n", "k"), [(1, 32), (21, 64), (533, 96), (40, 4544)])
def test_panel_gemm_matches_float32_and_every_variant_gives_the_same_bits(
    isa: str, rows: int, n: int, k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = torch.Generator().manual_seed(rows * 1000 + n)
    x = torch.randn(2, rows, k, generator=gen).bfloat16()[1]
    w = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
    y = ops.panel_linear(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    torch.testing.assert_close(y.float(), x.float() @ w.float().T, rtol=8e-3, atol=1e-3)
    assert torch.equal(ops.panel_linear(x[-1:], w)[0], y[-1])  # a row's sums do not depend on the others
    monkeypatch.setenv("FALCONLM_NATIVE_ISA", "scalar")  # the same fused multiply-adds in the same order
    assert torch.equal(ops.panel_linear(x, w), y)


def test_many_rows_take_the_panel_gemm_where_it_pays(isa: str, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(ops.native_max_rows() + 3, 128, generator=gen).bfloat16()
    w = torch.randn(24, 128, generator=gen).bfloat16()
    monkeypatch.setattr(ops, "bf16_hardware", lambda: False)
    monkeypatch.setattr(ops, "PANEL_VARIANTS", (native.chosen_family(),))
    assert torch.equal(ops.linear(x, w), ops.panel_linear(x, w))
    monkeypatch.setattr(ops, "PANEL_VARIANTS", ())
    assert torch.equal(ops.linear(x, w), F.linear(x.float(), w.float()).bfloat16())  # float32 GEMM, widened


@pytest.mark.parametrize("kernel", ["rows", "panels"])
@pytest.mark.parametrize("rows", [1, 16, 70])
def test_a_matmul_gives_the_same_bits_on_any_number_of_threads(isa: str, kernel: str, rows: int) -> None:
    # Threads deal the weight rows out in shares (csrc/shares.h) whose ends move with the thread count; every
    # output is still one sum in a fixed order. 70 rows: two blocks of activation rows for the row kernel.
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1024, generator=gen).bfloat16()
    w = (torch.randn(1000, 1024, generator=gen) * 0.05).bfloat16()
    matmul = ops.linear_invariant if kernel == "rows" else ops.panel_linear
    results = []
    for count in (1, 2, 3):
        with torch_threads(count):
            results.append(matmul(x, w))
    torch.testing.assert_close(results[0].float(), x.float() @ w.float().T, rtol=8e-3, atol=1e-3)
    assert all(torch.equal(r, results[0]) for r in results[1:])
