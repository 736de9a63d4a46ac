"""Quantized decode speed: bf16 against int8 and int4 (groups of 32, 64, 128) on a bench checkpoint.

Shape (``--model-size``): bench-194m (hidden 1024, 12 layers, 16 heads, about 194M parameters) or bench-1b
(hidden 2048, 24 layers, 32 heads, about 1.15B parameters), both multi-query, vocab 65024, tied head: the same
random checkpoints as ``bench_core.py``. The quantized folders are written once with
:func:`falconlm.quant.quantize_checkpoint` (head int8, the default) and reused. Each variant runs in its own
subprocess, so its peak RSS is its own. Per variant:

* prefill tok/s of a 512-token prompt through the model's forward (``last_token_only=True``);
* decode tok/s at batch 1 and batch 8: a 16-token prompt, then greedy steps through the model's forward with a
  contiguous KV cache in a tight loop (``model(ids, kv_cache=cache, last_token_only=True)``);
* the same through ``falconlm.engine.engine.Engine`` (paged attention, scheduler, sampler) with ``--engine``;
* decode steps run through the fused native step where it applies (``falconlm.engine.fused_decode``; the
  kernels column says so); ``FALCONLM_FUSED_DECODE=0`` measures the torch path instead;
* weight bytes read per token (each stored tensor once: a tied head shares the embedding), the achieved
  GB/s at batch 1 (bytes x tok/s) and its share of the machine's read bandwidth, measured in the same run
  (``bench_core.read_bandwidth``); peak RSS (VmHWM).

llama.cpp on the same checkpoints, measured in the same run: ``bench_llamacpp.py``.

``--matmul`` instead times one matmul per layer shape at batch 1: bf16 ``F.linear`` and the native bf16 kernel,
the native quantized kernels, torch's fused CPU kernels, dequantize-then-matmul (the reference kernel) and a
torch.compile of dequantize-then-matmul.

    python benchmarks/bench_quant.py [--model-size 194m|1b] [--threads 2] [--isa avx512|avx2-base|...]
                                     [--variants bf16 int8 int4-g64 int4-g32 int4-g128] [--engine]
    python benchmarks/bench_quant.py --matmul [--model-size 194m|1b]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import (
    PROMPT_DECODE,
    add_common_args,
    apply_isa,
    bandwidth_line,
    best_time,
    checkpoint_folder,
    describe,
    make_checkpoint,
    model_config,
    native_variant,
    peak_rss_mib,
    quantized_folder,
    read_bandwidth,
    stored_bytes,
    worker_env,
)

VARIANTS = ("bf16", "int8", "int4-g64", "int4-g32", "int4-g128")
COLD_BYTES = 512 << 20  # copies of a weight per matmul measurement, together: more than the caches hold
PREFILL = 512


def worker(variant: str, out: Path, size: str, threads: int, new_tokens: int, engine: bool, kernel: str | None) -> dict:
    """Load one variant and measure it; returns one JSON-able row."""
    import torch

    from falconlm.engine.fused_decode import dense_step, fused_decoder
    from falconlm.engine.huge_pages import move_to_huge_pages
    from falconlm.model.dense import KVCache
    from falconlm.model.falcon import FalconForCausalLM
    from falconlm.native.ops import argmax
    from falconlm.quant import load_quantized

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    dtype = torch.bfloat16
    if variant == "bf16":
        model = FalconForCausalLM.from_pretrained(checkpoint_folder(out, size), dtype=dtype)
    else:
        model = load_quantized(quantized_folder(out, variant, size), dtype=dtype, kernel=kernel)
    move_to_huge_pages(model)  # as the engine's runner does
    config = model.config
    gen = torch.Generator().manual_seed(0)

    def decode(batch: int) -> None:
        # KVCache directly, in the known dtype: new_kv_cache reads lm_head.weight, which a quantized head
        # materialises (a transient that would otherwise land in the peak RSS).
        cache = KVCache(config, batch, PROMPT_DECODE + new_tokens, dtype)
        ids = torch.randint(0, config.vocab_size, (batch, PROMPT_DECODE), generator=gen)
        ids = argmax(model(ids, kv_cache=cache, last_token_only=True)[:, -1])[:, None]
        for _ in range(new_tokens - 1):
            logits = dense_step(model, ids, cache)
            if logits is None:
                logits = model(ids, kv_cache=cache, last_token_only=True)[:, -1]
            ids = argmax(logits)[:, None]

    def prefill() -> None:
        cache = KVCache(config, 1, PREFILL, dtype)
        model(torch.randint(0, config.vocab_size, (1, PREFILL), generator=gen), kv_cache=cache, last_token_only=True)

    row = {"variant": variant, "weights_mib": stored_bytes(model) / 2**20}
    prefill()  # warm-up at the measured shape
    row["prefill_tok_s"] = PREFILL / best_time(prefill, repeats=3)
    decode(1)  # warm-up
    for batch in (1, 8):
        row[f"b{batch}_tok_s"] = batch * new_tokens / best_time(lambda b=batch: decode(b), repeats=2)
    row["gb_s_b1"] = stored_bytes(model) * row["b1_tok_s"] / 1e9
    row["peak_rss_mib"] = peak_rss_mib()
    if engine:
        row |= _engine_rows(model, new_tokens)
    row["kernels"] = sorted({m.kernel.name for m in model.modules() if hasattr(m, "kernel")})
    if fused_decoder(model.transformer) is not None:
        row["kernels"].append("fused decode")
    row["native"] = native_variant()
    return row


def _engine_rows(model, new_tokens: int) -> dict:
    import torch

    from falconlm.engine.engine import Engine, EngineConfig
    from falconlm.engine.sampling_params import SamplingParams

    class _NoText:  # token ids only: the benchmark measures the engine, not detokenization
        eos_token_id = None

        def decode(self, ids, skip_special_tokens=False):
            return ""

    eng = Engine(model, _NoText(), EngineConfig(max_num_seqs=8, enable_prefix_caching=False))
    gen = torch.Generator().manual_seed(1)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    rows = {}
    eng.generate([[1, 2, 3, 4]], [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)])  # warm-up
    for batch in (1, 8):
        prompts = torch.randint(0, model.config.vocab_size, (batch, PROMPT_DECODE), generator=gen).tolist()
        seconds = best_time(lambda p=prompts: eng.generate(p, [params] * len(p)), repeats=1)
        rows[f"engine_b{batch}_tok_s"] = batch * new_tokens / seconds
    return rows


# ---- one matmul per layer shape ------------------------------------------------------------------------------
def matmul_table(threads: int, size: str) -> str:
    """Batch-1 matmul time per layer shape of a bench model, for each way to run a quantized weight."""
    import torch
    import torch.nn.functional as F

    from falconlm.native import kernels
    from falconlm.native.ops import linear as native_linear
    from falconlm.quant.kernels import WeightSpec, select_kernel
    from falconlm.quant.primitives import dequantize_int4, plan_groups, quantize_int4, quantize_int8, unpack_int4

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    cfg = model_config(size)
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    shapes = {"qkv": (cfg.qkv_out_features, h), "dense": (h, h), "h_to_4h": (f, h), "4h_to_h": (h, f)}
    shapes["lm_head"] = (cfg.vocab_size, h)
    dtype = torch.bfloat16

    def dequant_int8(x, q, s):
        return F.linear(x, q.to(x.dtype) * s[:, None])

    def dequant_int4(x, q, s, z, g):
        return F.linear(x, dequantize_int4(unpack_int4(q), s, z, g).to(x.dtype))

    compiled8 = torch.compile(dequant_int8, dynamic=False)
    compiled4 = torch.compile(dequant_int4, dynamic=False)

    def timed(call, sets: list) -> float:
        """Microseconds per call, cycling through ``sets`` (copies of one weight that together overflow the
        caches, so weights come from memory as they do in a decode step); compute-bound paths run fewer."""
        begin = time.perf_counter()
        call(sets[0])
        if time.perf_counter() - begin > 5e-3:
            sets = sets[:3]
        best = float("inf")
        for _ in range(3):
            begin = time.perf_counter()
            for item in sets:
                call(item)
            best = min(best, (time.perf_counter() - begin) / len(sets))
        return best * 1e6

    def copies(tensors: tuple, nbytes: int) -> list[tuple]:
        return [tuple(t.clone() for t in tensors) for _ in range(max(2, -(-COLD_BYTES // nbytes)))]

    lines = [
        f"{describe(size)}: batch-1 matmul, microseconds per call, weights read from memory (bf16 activations, "
        f"{threads} threads); (GB/s of weight bytes)",
        "",
        "| layer [N, K] | bf16 F.linear | bf16 native | int8 native | int8 torch fused | int8 dequant+mm | "
        "int8 compiled | int4 g64 native | int4 g64 torch fused | int4 g64 dequant+mm | int4 g64 compiled |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k) * 0.02
        x = torch.randn(1, k, dtype=dtype)
        plain = copies((w.to(dtype),), n * k * 2)
        cells = []
        for fn in (F.linear, native_linear):
            us = timed(lambda ws, x=x, fn=fn: fn(x, *ws), plain)
            cells.append(f"{us:.0f} ({n * k * 2 / 1e3 / us:.1f})")
        del plain
        for qt in (quantize_int8(w), quantize_int4(w, plan_groups(k, 64))):
            spec = WeightSpec.of(qt)
            if kernels() is not None:
                fast = select_kernel(spec, "cpu", "native")
                tiled = copies(tuple(fast.prepare(qt, dtype).values()), qt.nbytes)
                us = timed(lambda ws, x=x, fast=fast, spec=spec: fast.matmul(x, ws, spec), tiled)
                cells.append(f"{us:.0f} ({qt.nbytes / 1e3 / us:.1f})")
                del tiled
            else:
                cells.append("-")
            cpu = select_kernel(spec, "cpu", "cpu")
            fused = copies(tuple(cpu.prepare(qt, dtype).values()), qt.nbytes)
            us = timed(lambda ws, x=x, cpu=cpu, spec=spec: cpu.matmul(x, ws, spec), fused)
            cells.append(f"{us:.0f} ({qt.nbytes / 1e3 / us:.1f})")
            del fused
            stored = (qt.qweight, qt.scales.to(dtype)) + (() if qt.bits == 8 else (qt.zeros.to(dtype),))
            sets = copies(stored, qt.nbytes)
            if qt.bits == 8:
                cells += [f"{timed(lambda ws, x=x: dequant_int8(x, *ws), sets):.0f}"]
                cells += [f"{timed(lambda ws, x=x: compiled8(x, *ws), sets):.0f}"]
            else:
                cells += [f"{timed(lambda ws, x=x: dequant_int4(x, *ws, 64), sets):.0f}"]
                cells += [f"{timed(lambda ws, x=x: compiled4(x, *ws, 64), sets):.0f}"]
        lines.append(f"| {name} [{n}, {k}] | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- driver --------------------------------------------------------------------------------------------------
def render(rows: list[dict], args: argparse.Namespace, bandwidth: float) -> str:
    native = rows[0]["native"] if rows else "unknown"
    lines = [
        f"{describe(args.model_size)}, bf16 activations, {args.threads} threads, {args.new_tokens} new tokens "
        f"after a {PROMPT_DECODE}-token prompt, native kernels: {native}",
        bandwidth_line(bandwidth, args.threads),
        "",
        f"| weights | MiB | prefill {PREFILL} tok/s | decode b1 tok/s | decode b8 tok/s | GB/s b1 | % of read bw "
        "| peak RSS MiB | " + ("engine b1 tok/s | engine b8 tok/s | " if args.engine else "") + "kernels |",
        "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.engine else "") + "---|",
    ]
    for r in rows:
        eng = f"{r['engine_b1_tok_s']:.1f} | {r['engine_b8_tok_s']:.1f} | " if args.engine else ""
        lines.append(
            f"| {r['variant']} | {r['weights_mib']:.0f} | {r['prefill_tok_s']:.0f} | {r['b1_tok_s']:.1f} | "
            f"{r['b8_tok_s']:.1f} | {r['gb_s_b1']:.1f} | {100 * r['gb_s_b1'] / bandwidth:.0f}% | "
            f"{r['peak_rss_mib']:.0f} | {eng}{', '.join(r['kernels']) or '-'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--engine", action="store_true", help="also measure through the serving Engine")
    parser.add_argument("--kernel", default=None, help="force a quantized kernel (cpu, reference)")
    parser.add_argument("--matmul", action="store_true", help="time single matmuls per kernel instead")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    apply_isa(args.isa)
    if args.matmul:
        print(matmul_table(args.threads, args.model_size))
        return
    if args.worker:
        row = worker(args.worker, args.out, args.model_size, args.threads, args.new_tokens, args.engine, args.kernel)
        print(json.dumps(row))
        return
    make_checkpoint(checkpoint_folder(args.out, args.model_size), args.model_size)
    for variant in args.variants:  # write the folders first, outside the measured processes
        if variant != "bf16":
            quantized_folder(args.out, variant, args.model_size)
    bandwidth = read_bandwidth(args.threads)
    print(f"  memory read bandwidth: {bandwidth:.1f} GB/s", file=sys.stderr)
    rows = []
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--worker", variant, "--model-size", args.model_size]
        cmd += ["--threads", str(args.threads), "--new-tokens", str(args.new_tokens), "--out", str(args.out)]
        cmd += ["--engine"] if args.engine else []
        cmd += ["--kernel", args.kernel] if args.kernel else []
        done = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(args.threads), check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  measured {variant}: {rows[-1]['b1_tok_s']:.1f} tok/s at batch 1", file=sys.stderr)
    bandwidth = max(bandwidth, read_bandwidth(args.threads))  # a shared machine may have been busy at the start
    print(render(rows, args, bandwidth))


if __name__ == "__main__":
    main()
