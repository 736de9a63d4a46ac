"""The prepared GPU check: run it once on a machine with an NVIDIA GPU (CI never needs one).

1. The Triton int4 group-wise kernel (``falconlm.quant.kernels.triton``) against the dequantize-then-matmul
   reference on the layer shapes of bench-1b, at 1 and 16 rows: largest relative error, the kernel's time (CUDA
   events, L2 flushed before each run: ``triton.testing.do_bench``) and the time of one call from Python (launch
   included), then a sweep of its tile width and warps at 1 row.
2. Greedy decode of bench-1b on CUDA (random weights, Falcon-7B style, hidden 2048, 24 layers, multi-query,
   about 1.15B parameters): falconlm's engine in bfloat16, int8 and int4 g64 against transformers in bfloat16, the
   same run, batch 1 and batch 8, 128 new tokens after a 16-token prompt (the prompt's time included), with the
   weight bytes streamed per batch-1 step against the device's copy bandwidth measured in the same run. Each is
   timed twice with other prompts: the first run meets its shapes for the first time, so per-shape costs (such as
   compiled attention graphs) show as the gap between the two.
3. Batch invariance on CUDA: 16 greedy requests through ``LLM.generate`` in batches of 1, 3 and 16, in bfloat16
   and int4, with and without ``deterministic``: how many requests got the tokens they got alone.
4. Where a batch-8 decode step's time goes on CUDA (``torch.profiler``), bfloat16 and int8: the top operators
   by CPU time and by GPU time.

    python benchmarks/bench_gpu.py [--out bench-out] [--new-tokens 128] [--skip triton invariance profile decode]

It exits with one line (code 2) where no CUDA device or no triton is found, and with code 1 when a check fails
(the Triton kernel off the reference, or a stage that raised); every stage runs either way.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import checkpoint_folder, describe, make_checkpoint, quantized_folder

PROMPT = 16
SIZE = "1b"
KV_CACHE_BYTES = 4 << 30  # plenty for these runs, and quick to allocate next to a transformers copy
TRITON_TOLERANCE = 2e-2  # largest error relative to the output's largest value (bf16 outputs, fp32 sums)
STAGES = ("triton", "decode", "invariance", "profile")  # in the order they run: the headline figures first


def cuda_time(fn: Callable[[], object], repeats: int = 20) -> float:
    """Median seconds of ``fn()`` on the GPU (synchronised)."""
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """The device's copy bandwidth in GB/s (bytes read plus bytes written), best of a few 2 GiB copies."""
    import torch

    src = torch.empty(1 << 30, dtype=torch.int16, device="cuda")
    dst = torch.empty_like(src)
    seconds = min(cuda_time(lambda: dst.copy_(src), repeats=5) for _ in range(3))
    return 2 * src.numel() * src.element_size() / seconds / 1e9


def kernel_seconds(fn: Callable[[], object]) -> float:
    """The kernel time of ``fn`` on the GPU in seconds (median, L2 flushed before each run)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


def triton_rows(shapes: list[tuple[int, int]]) -> tuple[list[str], bool]:
    """The kernel against the reference per shape and row count; True when every error is within tolerance."""
    import torch

    from falconlm.quant.kernels import WeightSpec, select_kernel
    from falconlm.quant.kernels.triton import int4_matmul
    from falconlm.quant.primitives import plan_groups, quantize_int4

    lines = ["| layer [N, K] | rows | max rel error | triton kernel us | weight GB/s | triton call us | reference us |"]
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    sweep = ["", "| layer [N, K] | block_n | warps | kernel us at 1 row |", "|---|---:|---:|---:|"]
    ok = True
    for n, k in shapes:
        qt = quantize_int4(torch.randn(n, k) * 0.02, plan_groups(k, 64)).to(device="cuda")
        spec = WeightSpec.of(qt)
        fast, ref = select_kernel(spec, "cuda", "triton"), select_kernel(spec, "cuda", "reference")
        fast_w = tuple(fast.prepare(qt, torch.bfloat16).values())
        ref_w = tuple(ref.prepare(qt, torch.bfloat16).values())
        weight_bytes = sum(t.numel() * t.element_size() for t in fast_w)
        for rows in (1, 16):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            y, expected = fast.matmul(x, fast_w, spec).float(), ref.matmul(x, ref_w, spec).float()
            err = float((y - expected).abs().max() / expected.abs().max())
            ok &= err <= TRITON_TOLERANCE
            t_kernel = kernel_seconds(lambda x=x, f=fast, w=fast_w, s=spec: f.matmul(x, w, s))
            t_call = cuda_time(lambda x=x, f=fast, w=fast_w, s=spec: f.matmul(x, w, s))
            t_ref = kernel_seconds(lambda x=x, r=ref, w=ref_w, s=spec: r.matmul(x, w, s))
            lines.append(
                f"| [{n}, {k}] | {rows} | {err:.1e} | {t_kernel * 1e6:.1f} | {weight_bytes / t_kernel / 1e9:.0f} "
                f"| {t_call * 1e6:.0f} | {t_ref * 1e6:.0f} |"
            )
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        for block_n in (16, 32, 64, 128):
            for warps in (2, 4, 8):
                seconds = kernel_seconds(lambda x=x, ws=fast_w, s=spec, b=block_n, w=warps: int4_matmul(x, ws, s, b, w))
                sweep.append(f"| [{n}, {k}] | {block_n} | {warps} | {seconds * 1e6:.1f} |")
    return lines + sweep, ok


def cuda_llm(path: Path, max_num_seqs: int, **options: object):
    """An ``LLM`` over ``path`` on CUDA in bfloat16 with a KV cache of ``KV_CACHE_BYTES``."""
    from falconlm import LLM

    return LLM(
        path,
        dtype="bfloat16",
        device="cuda",
        max_num_seqs=max_num_seqs,
        kv_cache_memory=KV_CACHE_BYTES,
        skip_tokenizer_init=True,
        **options,
    )


def invariance_rows(out: Path) -> list[str]:
    """Requests whose greedy tokens in batches of 3 and 16 equal theirs alone, per weights and mode."""
    import torch

    from falconlm import SamplingParams

    folder = make_checkpoint(checkpoint_folder(out, SIZE), SIZE)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 65024, (8 + 5 * i,), generator=gen).tolist() for i in range(16)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    lines = ["| weights | deterministic | same in batches of 3 | same in a batch of 16 |", "|---|---|---:|---:|"]
    for label, path in (("bf16", folder), ("int4 g64", quantized_folder(out, "int4-g64", SIZE))):
        for deterministic in (False, True):
            llm = cuda_llm(path, 16, enable_prefix_caching=False, deterministic=deterministic)
            alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
            threes = [o.outputs[0].token_ids for i in range(0, 16, 3) for o in llm.generate(prompts[i : i + 3], params)]
            sixteen = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
            same3 = sum(list(a) == list(b) for a, b in zip(alone, threes, strict=True))
            same16 = sum(list(a) == list(b) for a, b in zip(alone, sixteen, strict=True))
            lines.append(f"| {label} | {deterministic} | {same3}/16 | {same16}/16 |")
            print(lines[-1], file=sys.stderr, flush=True)
            del llm
            torch.cuda.empty_cache()
    return lines


def profile_rows(out: Path) -> list[str]:
    """torch.profiler over 16 greedy tokens at batch 8 through ``LLM.generate``, bfloat16 and int8 weights."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from falconlm import SamplingParams

    lines = []
    folder = make_checkpoint(checkpoint_folder(out, SIZE), SIZE)
    for label, path in (("bf16", folder), ("int8", quantized_folder(out, "int8", SIZE))):
        llm = cuda_llm(path, 8)
        gen = torch.Generator().manual_seed(2)
        params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
        llm.generate(torch.randint(0, 65024, (8, PROMPT), generator=gen).tolist(), params)  # warm-up
        prompts = torch.randint(0, 65024, (8, PROMPT), generator=gen).tolist()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            llm.generate(prompts, params)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        averages = prof.key_averages()
        lines.append(f"### {label}, batch 8, 16 tokens: {seconds * 1e3:.0f} ms under the profiler")
        lines.append(averages.table(sort_by="self_cpu_time_total", row_limit=12))
        lines.append(averages.table(sort_by="self_cuda_time_total", row_limit=8))
        del llm
        torch.cuda.empty_cache()
    return lines


def first_and_steady(run: Callable[[int, int], None], new_tokens: int) -> list[float]:
    """tok/s of ``run(batch, seed)`` (``new_tokens`` per row) at batch 1 and 8, each run twice with other prompts:
    [batch 1, batch 8, batch 1 first run, batch 8 first run]. A first run meets its shapes for the first time, so
    any per-shape cost (a compiled attention graph, say) lands there, as it would on a server."""
    import torch

    rates = {}
    for batch in (1, 8):
        for label, seed in (("first", 0), ("steady", 1)):
            torch.cuda.synchronize()
            start = time.perf_counter()
            run(batch, seed)
            torch.cuda.synchronize()
            rates[label, batch] = batch * new_tokens / (time.perf_counter() - start)
    return [rates["steady", 1], rates["steady", 8], rates["first", 1], rates["first", 8]]


def falconlm_tok_s(folder: Path, new_tokens: int) -> tuple[list[float], str]:
    """:func:`first_and_steady` through ``LLM.generate``, and the kernels its quantized layers took."""
    import torch

    from falconlm import SamplingParams

    llm = cuda_llm(folder, 8)
    kernel = "+".join(sorted({m.kernel.name for m in llm.model.modules() if hasattr(m, "kernel")})) or "dense"
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    def run(batch: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        llm.generate(torch.randint(0, 65024, (batch, PROMPT), generator=gen).tolist(), params)

    return first_and_steady(run, new_tokens), kernel


def transformers_tok_s(folder: Path, new_tokens: int) -> tuple[list[float], str]:
    import torch
    from transformers import FalconForCausalLM as HFModel

    model = HFModel.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
    kwargs = {"do_sample": False, "min_new_tokens": new_tokens, "max_new_tokens": new_tokens, "pad_token_id": 0}

    def run(batch: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, model.config.vocab_size, (batch, PROMPT), generator=gen).cuda()
        with torch.no_grad():
            model.generate(ids, **kwargs)

    return first_and_steady(run, new_tokens), "dense"


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def decode_rows(out: Path, new_tokens: int) -> list[str]:
    import torch

    folder = make_checkpoint(checkpoint_folder(out, SIZE), SIZE)
    bandwidth = copy_bandwidth()
    lines = [
        f"{describe(SIZE)}; device copy bandwidth {bandwidth:.0f} GB/s (read + written)",
        "| engine, weights | kernel | batch 1 tok/s | batch 8 tok/s | first runs: b1 / b8 | weight GB/s at batch 1 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    runs = [("transformers bf16", folder, transformers_tok_s), ("falconlm bf16", folder, falconlm_tok_s)]
    for variant in ("int8", "int4-g64"):
        runs.append((f"falconlm {variant}", quantized_folder(out, variant, SIZE), falconlm_tok_s))
    for name, path, fn in runs:
        (b1, b8, first1, first8), kernel = fn(path, new_tokens)
        torch.cuda.empty_cache()  # the engine went with fn's frame
        gbs = weight_bytes(path) * b1 / 1e9
        lines.append(f"| {name} | {kernel} | {b1:.1f} | {b8:.1f} | {first1:.1f} / {first8:.1f} | {gbs:.0f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def run_stage(name: str, fn: Callable[[], list[str]], failures: list[str]) -> None:
    start = time.perf_counter()
    print(f"\n## {name}", flush=True)
    try:
        print("\n".join(fn()), flush=True)
    except Exception:  # every stage runs: one that breaks is reported and counted
        traceback.print_exc()
        failures.append(name)
    print(f"({name}: {time.perf_counter() - start:.0f} s)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="where the bench checkpoints are cached")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--skip", nargs="*", choices=STAGES, default=[], help="stages to leave out")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; run it on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("bench_gpu: triton is not installed (pip install '.[triton]')", file=sys.stderr)
        return 2
    import transformers

    print(
        f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"transformers {transformers.__version__}"
    )
    torch.set_grad_enabled(False)
    failures: list[str] = []
    if "triton" not in args.skip:

        def triton_stage() -> list[str]:
            lines, ok = triton_rows([(2048 + 2 * 64, 2048), (2048, 2048), (8192, 2048), (2048, 8192), (65024, 2048)])
            if not ok:
                failures.append(f"triton error above {TRITON_TOLERANCE}")
            return lines

        run_stage("Triton int4 kernel", triton_stage, failures)
    if "decode" not in args.skip:
        run_stage("decode", lambda: decode_rows(args.out, args.new_tokens), failures)
    if "invariance" not in args.skip:
        run_stage("batch invariance on CUDA", lambda: invariance_rows(args.out), failures)
    if "profile" not in args.skip:
        run_stage("profile", lambda: profile_rows(args.out), failures)
    if failures:
        print(f"bench_gpu: failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
