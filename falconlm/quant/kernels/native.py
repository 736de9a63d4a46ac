"""int8 / int4 weight matmuls on every CPU, through ``falconlm.native``'s ``falcon_qlinear``.

The kernel quantizes each activation row to int8 on the fly, in blocks of 32 columns with a float scale each (so a
large activation, which Falcon's bigger models have in a few channels, coarsens only its own block), then
multiplies bytes four at a time per lane (``vpdpbusd`` with AVX-512 VNNI or AVX-VNNI, ``vpmaddubsw`` with AVX2,
``sdot`` on ARM), the way llama.cpp's q8_0 / q4_0 dot products work. At batch 1 it reads the weights at close to
memory speed, which torch's packed ops do not.

Weights are re-tiled once at load (``prepare``): each run of 16 output rows is contiguous, one 64-byte line
holding 16 rows x 4 columns (int8, stored as ``q + 128`` so the weight is the unsigned operand) or 16 rows x 8
columns (int4: low nibble column ``c``, high nibble ``c + 4``). int4 scales and zeros go with their tile as
bfloat16 ``[N / 16, G, 2, 16]``; int8 scales stay float32 ``[N]``. Both are kept as integer views of those
bits (int16 / int32), so a module's ``.to(dtype)`` leaves them alone.

The result differs from the dequantized reference by the activations' rounding to int8 (about 0.5% relative
error per matmul, as in llama.cpp); the tests bound it.

:class:`NativeGemmKernel` reads the same tiles; on CPUs with AMX the engine gives it to each weight (not under
``--deterministic``) so that prompt-sized batches go through torch's bfloat16 GEMM instead.
"""

from __future__ import annotations

import threading

import torch

from ...native import kernels, threads_for
from ..primitives import QuantizedTensor, dequantize_int4, unpack_int4
from . import WeightSpec

TILE = 16
INT4_GROUPS = (32, 64, 128)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # float16 goes through float32


ACTIVATION_BLOCK = 32  # columns per activation scale, as llama.cpp's q8_0: an outlier spoils only its own block
GEMM_MIN_ROWS = 128  # NativeGemmKernel: from this many rows the dequantize + GEMM path is faster (AMX)
STRIP_BYTES = 16 << 20  # NativeGemmKernel: bfloat16 weight rows dequantized at a time (one reused buffer)


class NativeKernel:
    name = "native"

    def supports(self, spec: WeightSpec, device: torch.device) -> bool:
        if device.type != "cpu" or spec.out_features % TILE:
            return False
        if spec.bits == 4 and spec.group_size not in INT4_GROUPS:
            return False
        return spec.padded_in % ACTIVATION_BLOCK == 0 and kernels() is not None

    def prepare(self, qt: QuantizedTensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if dtype not in DTYPES:
            raise ValueError(f"the native kernel takes {DTYPES} activations, not {dtype}")
        n, k = qt.out_features, qt.padded_in
        rows = TILE * 64  # re-tiled a strip of rows at a time: temporaries stay a few MB whatever the matrix
        if qt.bits == 8:
            tiled = torch.empty(n // TILE, k // 4, TILE, 4, dtype=torch.uint8)
            for start in range(0, n, rows):
                u = qt.qweight[start : start + rows].view(torch.uint8) ^ 0x80  # q + 128, as the unsigned operand
                tiled[start // TILE : (start + rows) // TILE] = u.view(-1, TILE, k // 4, 4).permute(0, 2, 1, 3)
            return {"qweight": tiled, "scales": qt.scales.to(torch.float32).contiguous().view(torch.int32)}
        g = qt.group_size
        groups = k // g
        tiled = torch.empty(n // TILE, k // 8, TILE, 4, dtype=torch.uint8)
        for start in range(0, n, rows):
            q = unpack_int4(qt.qweight[start : start + rows]).view(-1, TILE, k // 8, 2, 4)
            tiled[start // TILE : (start + rows) // TILE] = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).permute(0, 2, 1, 3)
        zeros = qt.zeros if qt.zeros is not None else torch.zeros_like(qt.scales)
        sz = torch.stack([qt.scales.view(n // TILE, TILE, groups), zeros.view(n // TILE, TILE, groups)], dim=2)
        sz = sz.permute(0, 3, 2, 1).to(torch.bfloat16).contiguous()
        return {"qweight": tiled, "scales": sz.view(torch.int16)}

    def matmul(self, x: torch.Tensor, weights: tuple[torch.Tensor, ...], spec: WeightSpec) -> torch.Tensor:
        # Called ~50 times per decoded token: kept to one allocation and one foreign call (about 5 us).
        dtype = x.dtype
        if dtype is torch.float16:
            x = x.float()
        if not x.is_contiguous():
            x = x.contiguous()
        y = x.new_empty(*x.shape[:-1], spec.out_features)
        bf16, rows = int(x.dtype is torch.bfloat16), x.numel() // spec.in_features
        kernels().falcon_qlinear(  # the chosen variant's library (FALCONLM_NATIVE_ISA may change between calls)
            x.data_ptr(), bf16, rows, spec.in_features, spec.in_features, spec.padded_in, ACTIVATION_BLOCK,
            spec.group_size, spec.bits, weights[0].data_ptr(), weights[1].data_ptr(), spec.out_features,
            y.data_ptr(), bf16, threads_for(rows * spec.out_features * spec.padded_in),
        )  # fmt: skip
        return y if dtype is y.dtype else y.to(dtype)

    def dequantize(self, weights: tuple[torch.Tensor, ...], spec: WeightSpec, dtype: torch.dtype) -> torch.Tensor:
        return self.rows(weights, torch.arange(spec.out_features), spec, dtype)

    def rows(self, weights: tuple[torch.Tensor, ...], ids: torch.Tensor, spec: WeightSpec, dtype: torch.dtype):
        """Dequantized rows ``ids`` (any shape) of the tiled matrix -> [*ids.shape, in_features]: one foreign
        call (an embedding lookup each decode step), or torch where the library is missing or ``dtype`` is
        float16; the two give the same bits."""
        lib = kernels()
        if lib is None or dtype is torch.float16 or ids.device.type != "cpu":
            return self.torch_rows(weights, ids, spec, dtype)
        flat = ids.reshape(-1).to(torch.int64).contiguous()
        y = torch.empty(*ids.shape, spec.in_features, dtype=dtype)
        tiled, scales = weights
        lib.falcon_qrows(
            tiled.data_ptr(), scales.data_ptr(), spec.bits, spec.padded_in, spec.in_features, spec.group_size,
            flat.data_ptr(), flat.numel(), y.data_ptr(), int(dtype is torch.bfloat16),
        )  # fmt: skip
        return y

    def torch_rows(self, weights: tuple[torch.Tensor, ...], ids: torch.Tensor, spec: WeightSpec, dtype: torch.dtype):
        """:meth:`rows` in torch ops."""
        flat = ids.reshape(-1)
        tile, lane = flat // TILE, flat % TILE
        tiled, scales = weights
        if spec.bits == 8:
            q = tiled[tile, :, lane].reshape(-1, spec.in_features).to(torch.int16) - 128  # [R, K]
            w = q.float() * scales.view(torch.float32)[flat, None]
        else:
            packed = tiled[tile, :, lane]  # [R, K / 8, 4]
            q = torch.stack([packed & 0x0F, packed >> 4], dim=2).reshape(-1, spec.padded_in)
            sz = scales.view(torch.bfloat16)[tile, :, :, lane].float()  # [R, G, 2]
            w = dequantize_int4(q, sz[..., 0], sz[..., 1], spec.group_size)[:, : spec.in_features]
        return w.to(dtype).view(*ids.shape, spec.in_features)


class NativeGemmKernel(NativeKernel):
    """The native kernel, except that bfloat16 batches of GEMM_MIN_ROWS rows or more go through torch's GEMM
    over the weight dequantized to bfloat16 (STRIP_BYTES of it at a time, into one reused buffer). On a CPU whose
    bfloat16 GEMMs run on AMX tiles that is about 2.5x the int8 dot products at 512 rows (bench-1b shapes), and
    computes what the reference kernel does: bfloat16 activations times the dequantized weight. A row's result
    then depends on its batch's size, so ``--deterministic`` keeps :class:`NativeKernel`."""

    name = "native+gemm"

    def matmul(self, x: torch.Tensor, weights: tuple[torch.Tensor, ...], spec: WeightSpec) -> torch.Tensor:
        if x.dtype is not torch.bfloat16 or x.numel() < GEMM_MIN_ROWS * spec.in_features:
            return super().matmul(x, weights, spec)
        k, n = spec.in_features, spec.out_features
        x2 = x.reshape(-1, k)
        strip = min(n, max(TILE, STRIP_BYTES // (2 * k) // TILE * TILE))
        buffer = _strip_buffer(strip * k)
        y = x2.new_empty(x2.shape[0], n)
        tiled, scales = weights
        for n0 in range(0, n, strip):
            width = min(strip, n - n0)
            w_t = buffer[: k * width].view(k, width)  # rows n0 .. n0 + width of W, transposed
            kernels().falcon_qdequant_t(
                tiled.data_ptr(), scales.data_ptr(), spec.bits, spec.padded_in, k, spec.group_size, n0, width,
                w_t.data_ptr(), torch.get_num_threads(),
            )  # fmt: skip
            if width == n:
                torch.mm(x2, w_t, out=y)
            else:
                y[:, n0 : n0 + width] = x2 @ w_t
        return y.view(*x.shape[:-1], n)


_STRIPS = threading.local()


def _strip_buffer(numel: int) -> torch.Tensor:
    """This thread's bfloat16 buffer of at least ``numel`` elements, reused across calls: a fresh one each call
    would cost its page faults (several ms for 16 MB)."""
    buffer = getattr(_STRIPS, "buffer", None)
    if buffer is None or buffer.numel() < numel:
        buffer = _STRIPS.buffer = torch.empty(numel, dtype=torch.bfloat16)
    return buffer


NATIVE_KERNEL = NativeKernel()
NATIVE_GEMM_KERNEL = NativeGemmKernel()
