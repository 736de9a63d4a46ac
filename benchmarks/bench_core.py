"""Core benchmark: falconlm against transformers on the same random Falcon-7B-style checkpoint, same run.

Shape: hidden 1024, 12 layers, 16 heads, multi-query, vocab 65024 (about 194M parameters). For each dtype it
measures prefill of a 512-token prompt, greedy decode of 128 tokens at batch 1 and batch 8, the peak RSS, and
the achieved GB/s of weight reading at batch 1. Each (implementation, dtype) runs in its own subprocess so the
peak RSS belongs to it alone.

    python benchmarks/bench_core.py [--threads 2] [--dtypes float32 bfloat16] [--out bench-out]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROMPT_DECODE = 16  # prompt length for the decode rows


def make_checkpoint(folder: Path) -> Path:
    """A random bench-194m checkpoint in float32 (made once, reused)."""
    import torch

    from falconlm.model.config import preset
    from falconlm.model.falcon import FalconForCausalLM

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    model = FalconForCausalLM(preset("bench-194m"))
    model.init_weights(seed=0)
    model.save_pretrained(folder)
    return folder


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def best_time(fn, repeats: int = 1) -> float:
    """The fastest of ``repeats`` calls of ``fn``, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def stored_bytes(model) -> int:
    """Bytes of every parameter and buffer, each storage once (a tied head shares the embedding's)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def worker(impl: str, dtype_name: str, folder: Path, threads: int, prefill: int, new_tokens: int) -> dict:
    """Run one implementation at one dtype; return its measurements."""
    import torch

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    gen = torch.Generator().manual_seed(0)
    if impl == "falconlm":
        from falconlm.engine.engine import Engine, EngineConfig
        from falconlm.engine.sampling_params import SamplingParams
        from falconlm.model.falcon import FalconForCausalLM

        model = FalconForCausalLM.from_pretrained(folder, dtype=dtype)
        vocab = model.config.vocab_size

        class _NoText:  # token ids only: the benchmark measures the engine, not detokenization
            eos_token_id = None

            def decode(self, ids, skip_special_tokens=False):
                return ""

        engine = Engine(
            model, _NoText(), EngineConfig(max_num_seqs=8, max_num_batched_tokens=prefill, enable_prefix_caching=False)
        )

        def run_prefill(ids):
            params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
            engine.generate(ids.tolist(), [params] * ids.shape[0])

        def run_decode(ids):
            params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
            outs = engine.generate(ids.tolist(), [params] * ids.shape[0])
            assert all(len(o.token_ids) == new_tokens for o in outs)
    else:
        from transformers import FalconForCausalLM as HFModel

        model = HFModel.from_pretrained(folder, torch_dtype=dtype).eval()
        vocab = model.config.vocab_size

        def run_prefill(ids):
            model(ids, logits_to_keep=1)

        def run_decode(ids):
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            assert out.shape[1] == ids.shape[1] + new_tokens

    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    long_prompt = torch.randint(0, vocab, (1, prefill), generator=gen)
    run_prefill(long_prompt)  # warm-up at the measured shape (oneDNN builds its kernels per shape)
    prefill_s = best_time(lambda: run_prefill(long_prompt), repeats=3)
    result = {"impl": impl, "dtype": dtype_name, "prefill_tok_s": prefill / prefill_s}
    for batch in (1, 8):
        ids = torch.randint(0, vocab, (batch, PROMPT_DECODE), generator=gen)
        if batch == 1:
            run_decode(ids[:, :4])  # warm-up
        seconds = best_time(lambda ids=ids: run_decode(ids), repeats=2)
        result[f"decode_b{batch}_tok_s"] = batch * new_tokens / seconds
    result["gb_s_b1"] = weight_bytes * result["decode_b1_tok_s"] / 1e9
    result["weights_mib"] = weight_bytes / 2**20
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = args.out / "bench-194m"
    if args.worker:
        print(json.dumps(worker(*args.worker, folder, args.threads, args.prefill, args.new_tokens)))
        return
    make_checkpoint(folder)
    rows = []
    for dtype in args.dtypes:
        for impl in ("transformers", "falconlm"):
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                impl,
                dtype,
                "--threads",
                str(args.threads),
                "--prefill",
                str(args.prefill),
                "--new-tokens",
                str(args.new_tokens),
                "--out",
                str(args.out),
            ]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  measured {impl} {dtype}", file=sys.stderr)
    print(render(rows, args.threads))


def render(rows: list[dict], threads: int) -> str:
    lines = [
        f"bench-194m (hidden 1024, 12 layers, 16 heads, MQA, vocab 65024), {threads} threads",
        "",
        "| dtype | impl | prefill 512 tok/s | decode b1 tok/s | decode b8 tok/s | GB/s b1 | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    by_key = {(r["impl"], r["dtype"]): r for r in rows}
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['impl']} | {r['prefill_tok_s']:.0f} | {r['decode_b1_tok_s']:.1f} | "
            f"{r['decode_b8_tok_s']:.1f} | {r['gb_s_b1']:.1f} | {r['peak_rss_mib']:.0f} |"
        )
        if r["impl"] == "falconlm" and ("transformers", r["dtype"]) in by_key:
            ref = by_key[("transformers", r["dtype"])]
            ratio = [r[k] / ref[k] for k in ("prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s")]
            lines.append(
                f"| {r['dtype']} | ratio falconlm/transformers | {ratio[0]:.2f}x | {ratio[1]:.2f}x | "
                f"{ratio[2]:.2f}x | | |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
