"""The ARM NEON variant, built with Debian's aarch64 cross compiler and run under qemu-user, against the scalar
reference run here. ``.ci/run`` installs both tools; elsewhere the tests skip and say which is missing."""

from __future__ import annotations

import ctypes
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from falconlm import native
from falconlm.native import ops
from falconlm.native.decode import Layer, Rows, Shape, Weight
from falconlm.quant.kernels import WeightSpec
from falconlm.quant.kernels.native import NATIVE_KERNEL
from falconlm.quant.primitives import plan_groups, quantize_int4, quantize_int8

from ..conftest import needs_native

CROSS = shutil.which("aarch64-linux-gnu-g++")
QEMU = shutil.which("qemu-aarch64")
DRIVER = Path(__file__).parent / "csrc" / "kernel_driver.cpp"
needs_cross = pytest.mark.skipif(CROSS is None, reason="no aarch64 cross compiler (apt install g++-aarch64-linux-gnu)")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="no qemu-user (apt install qemu-user)")
FLAGS = {
    "neon+dotprod+i8mm": "-march=armv8.2-a+dotprod+i8mm",
    "neon+dotprod": "-march=armv8.2-a+dotprod",
    "neon": "-march=armv8-a",
}


@pytest.fixture(scope="module", params=sorted(FLAGS))
def driver(request, tmp_path_factory) -> tuple[str, Path]:
    """(instruction set, path) of the kernel driver built for 64-bit ARM, statically linked."""
    out = tmp_path_factory.mktemp("arm") / "kernel_driver"
    sources = [str(DRIVER), *map(str, sorted(native.SOURCES.glob("*.cpp")))]
    command = [CROSS, "-O2", "-std=c++17", "-fopenmp", "-static", FLAGS[request.param], "-I", str(native.SOURCES)]
    command += [*sources, "-o", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return request.param, out


def _run(driver: tuple[str, Path], op: str, fields: list[int], arrays: list[np.ndarray], tmp: Path) -> bytes:
    isa, path = driver
    (tmp / "in.bin").write_bytes(struct.pack(f"<{len(fields)}q", *fields) + b"".join(a.tobytes() for a in arrays))
    done = subprocess.run([QEMU, str(path), op, str(tmp / "in.bin"), str(tmp / "out.bin")], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == isa  # the build really is the variant it claims
    return (tmp / "out.bin").read_bytes()


@needs_cross
def test_the_arm_variants_compile(driver: tuple[str, Path]) -> None:
    assert driver[1].stat().st_size > 0


@needs_cross
@needs_qemu
@needs_native
def test_arm_kernels_match_the_scalar_reference(driver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FALCONLM_NATIVE_ISA", "scalar")
    gen = torch.Generator().manual_seed(3)
    # bf16 matmul: 5 rows (a register-block remainder) of 320 columns.
    x = torch.randn(5, 320, generator=gen).bfloat16()
    w = (torch.randn(48, 320, generator=gen) * 0.05).bfloat16()
    out = _run(driver, "linear", [5, 320, 48], [t.view(torch.int16).numpy() for t in (x, w)], tmp_path)
    arm = torch.from_numpy(np.frombuffer(out, dtype=np.int16).copy()).view(torch.bfloat16).view(5, 48).float()
    torch.testing.assert_close(arm, ops.linear_invariant(x, w).float(), rtol=8e-3, atol=1e-3)
    # bf16 panel GEMM: the same fused multiply-adds in the same order on every variant, so the same bits. 13 rows
    # (two 6-row blocks and one more), 21 weight rows (a panel and part of one), 264 columns (a block and a tail).
    x, w = torch.randn(13, 264, generator=gen).bfloat16(), (torch.randn(21, 264, generator=gen) * 0.05).bfloat16()
    out = _run(driver, "gemm", [13, 264, 21], [t.view(torch.int16).numpy() for t in (x, w)], tmp_path)
    arm = torch.from_numpy(np.frombuffer(out, dtype=np.int16).copy()).view(torch.bfloat16).view(13, 21)
    assert torch.equal(arm, ops.panel_linear(x, w))
    # int8 and int4 matmuls: integer dots, the same float steps: equal to float32 rounding. Five rows: with i8mm
    # two pairs through smmla and a last row through sdot.
    xf = torch.randn(5, 256, generator=gen)
    for bits in (8, 4):
        wf = torch.randn(32, 256, generator=gen) * 0.05
        qt = quantize_int8(wf) if bits == 8 else quantize_int4(wf, plan_groups(256, 64))
        spec = WeightSpec.of(qt)
        tiled, scales = NATIVE_KERNEL.prepare(qt, torch.float32).values()
        fields = [bits, 5, 256, 32, spec.group_size, tiled.numel(), scales.numel() * scales.element_size()]
        out = _run(driver, "qlinear", fields, [xf.numpy(), tiled.numpy(), scales.numpy()], tmp_path)
        arm = torch.from_numpy(np.frombuffer(out, dtype=np.float32).copy()).view(5, 32)
        torch.testing.assert_close(arm, NATIVE_KERNEL.matmul(xf, (tiled, scales), spec), rtol=1e-5, atol=1e-6)
        fields[1] = 1  # row 0 alone (sdot) gives the bits it got beside the others (with i8mm, through smmla)
        alone = _run(driver, "qlinear", fields, [xf[:1].numpy(), tiled.numpy(), scales.numpy()], tmp_path)
        assert torch.equal(torch.from_numpy(np.frombuffer(alone, dtype=np.float32).copy()), arm[0])
    # argmax with a tie, -inf, inf and NaN rows.
    logits = torch.randn(4, 1000, generator=gen)
    logits[0, 10] = logits[0, 900] = 30.0
    logits[1] = float("-inf")
    logits[2, 999] = float("inf")
    logits[3, 5] = float("nan")
    out = _run(driver, "argmax", [4, 1000], [logits.numpy()], tmp_path)
    assert np.frombuffer(out, dtype=np.int64).tolist() == ops.argmax(logits).tolist()
    # decode attention through scattered blocks, 8 query heads on 2 groups.
    k = torch.randn(16, 8, 2, 64, generator=gen)
    v = torch.randn(16, 8, 2, 64, generator=gen)
    q = torch.randn(3, 8, 64, generator=gen)
    tables = torch.stack([torch.randperm(16, generator=gen)[:6] for _ in range(3)])
    lens = torch.tensor([1, 20, 48])
    fields = [3, 8, 2, 64, 16, 8, 6]
    out = _run(driver, "attention", fields, [a.numpy() for a in (q, k, v, tables, lens)], tmp_path)
    arm = torch.from_numpy(np.frombuffer(out, dtype=np.float32).copy()).view(3, 8, 64)
    torch.testing.assert_close(arm, ops.decode_attention(q, k, v, tables, lens, 48), rtol=1e-5, atol=1e-5)


def _decode_weight(bits: int, n: int, k: int, gen: torch.Generator) -> tuple[Weight, list[np.ndarray]]:
    """One layer matrix for ``falcon_decode_layers`` (bfloat16, or int8 / int4 tiled by the native kernel's
    prepare), and the header fields and buffers the driver reads for it."""
    wf = torch.randn(n, k, generator=gen) * 0.05
    if bits == 16:
        w = wf.bfloat16().view(torch.int16).numpy()
        return Weight(w.ctypes.data, None, n, k, k, 0, 16), [np.array([16, n, k, k, 0, w.nbytes, 0]), w]
    qt = quantize_int8(wf) if bits == 8 else quantize_int4(wf, plan_groups(k, 64))
    spec = WeightSpec.of(qt)
    tiled, scales = (t.numpy() for t in NATIVE_KERNEL.prepare(qt, torch.float32).values())
    header = [bits, n, spec.padded_in, k, spec.group_size, tiled.nbytes, scales.nbytes]
    weight = Weight(tiled.ctypes.data, scales.ctypes.data, n, spec.padded_in, k, spec.group_size, bits)
    return weight, [np.array(header), tiled, scales]


# (cache dtype, two LayerNorms, row lengths after the step, block size): the 40B layout on a float32 cache with
# short rows; the 7B layout (one LayerNorm for both branches) on a bfloat16 cache with rows past PART_KEYS (512),
# which are attended in parts that threads share and then combined.
DECODE_CASES = {
    "two-ln-f32-short": (torch.float32, True, [3, 10], 4),
    "one-ln-bf16-long": (torch.bfloat16, False, [600, 1100], 16),
}


@needs_cross
@needs_qemu
@needs_native
@pytest.mark.parametrize("case", sorted(DECODE_CASES))
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_arm_fused_decode_matches_the_scalar_reference(driver, bits: int, case: str, tmp_path: Path,
                                                       monkeypatch) -> None:  # fmt: skip
    # Two layers of hidden 128 (4 heads of 32 on 2 KV groups), a paged cache with the rows' blocks scattered.
    monkeypatch.setenv("FALCONLM_NATIVE_ISA", "scalar")
    lib = native.kernels()
    assert lib is not None and lib.falcon_isa().decode() == "scalar"
    kv_dtype, two_ln, lengths, bs = DECODE_CASES[case]
    L, H, Hq, G, d, R = 2, 128, 4, 2, 32, len(lengths)
    tb = max(-(-n // bs) for n in lengths)
    blocks = R * tb
    gen = torch.Generator().manual_seed(5)
    layers, arrays, keep = (Layer * L)(), [], []
    for i in range(L):
        for name, (n, k) in {"qkv": ((Hq + 2 * G) * d, H), "dense": (H, Hq * d), "up": (4 * H, H),
                             "down": (H, 4 * H)}.items():  # fmt: skip
            weight, parts = _decode_weight(bits, n, k, gen)
            setattr(layers[i], name, weight)
            arrays += parts
    for i in range(L):
        norms = [(1 + 0.1 * torch.randn(H, generator=gen)).numpy(), (0.1 * torch.randn(H, generator=gen)).numpy()]
        norms = norms * 2 if two_ln else norms
        keep += norms
        layers[i].ln_attn_w, layers[i].ln_attn_b = norms[0].ctypes.data, norms[1].ctypes.data
        if two_ln:
            layers[i].ln_mlp_w, layers[i].ln_mlp_b = norms[2].ctypes.data, norms[3].ctypes.data
    arrays += keep
    kv = torch.randn(2, L, blocks, bs, G, d, generator=gen).to(kv_dtype)
    tables = torch.randperm(blocks, generator=gen).view(R, tb)
    lens = torch.tensor(lengths)
    angles = torch.rand(R, d // 2, generator=gen) * 6.28
    cos, sin = torch.cat([angles.cos()] * 2, dim=1), torch.cat([angles.sin()] * 2, dim=1)
    x = torch.randn(R, H, generator=gen)
    header = np.array([L, H, Hq, G, d, blocks, bs, R, tb, int(kv_dtype == torch.bfloat16), int(two_ln)])
    kv_bits = kv.view(torch.int16) if kv_dtype == torch.bfloat16 else kv
    out = _run(driver, "decode", [], [header, *arrays, kv_bits.numpy(), tables.numpy(), lens.numpy(), cos.numpy(),
                                      sin.numpy(), x.numpy()], tmp_path)  # fmt: skip
    arm_x = torch.from_numpy(np.frombuffer(out[: R * H * 4], dtype=np.float32).copy()).view(R, H)
    arm_kv = torch.frombuffer(bytearray(out[R * H * 4 :]), dtype=kv_dtype).view(kv.shape)

    ref_x, ref_kv = x.clone(), kv.clone()
    shape = Shape(L, H, Hq, G, d, 1e-5, int(kv_dtype == torch.bfloat16))
    rows = Rows(ref_kv[0].data_ptr(), ref_kv[1].data_ptr(), blocks * bs * G * d, bs * G * d, G * d, d, bs,
                tables.data_ptr(), tb, lens.data_ptr())  # fmt: skip
    lib.falcon_decode_layers(ctypes.addressof(shape), ctypes.addressof(layers), ctypes.addressof(rows),
                             ref_x.data_ptr(), R, cos.data_ptr(), sin.data_ptr(), 2, None, -1)  # fmt: skip
    assert (ref_kv != kv).any() and (ref_x != x).any()  # the reference really wrote the cache and the residual
    # Float32 sums in another order only (measured: at most 4e-7 on values up to 3); an activation rounded to
    # another int8 / bfloat16 value would move them by about 1e-3 (test_decode's WORST), a real mistake by ~1.
    torch.testing.assert_close(arm_x, ref_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(arm_kv.float(), ref_kv.float(), rtol=1e-5, atol=1e-5)
