"""Falcon-Mamba benchmark: falconlm against transformers on the same random Falcon-Mamba-style checkpoint, same run,
and decode speed against context length beside an attention model of the same size (bench-194m Falcon).

Shape ``200m``: hidden 1024, 20 Mamba-1 layers (intermediate 2048, state 16, conv 4, Δ rank 64), vocab 65024,
tied head, B/C/Δ norms (Falcon-Mamba): about 200M parameters, like bench-194m. ``--tiny`` runs a toy shape to prove
the script works.

Measured:

1. for each of ``--dtypes`` (float32 and bfloat16 by default): prefill of a ``--prefill``-token prompt (tok/s),
   greedy decode of ``--new-tokens`` at batch 1 and batch 8 (tok/s), falconlm's engine against transformers'
   ``FalconMambaForCausalLM.generate`` (on CPU transformers runs its sequential torch scan: the CUDA kernels are
   not there);
2. in ``--context-dtype``: per-token decode time at batch 1 after contexts of ``--contexts`` tokens (128 to 8k),
   for this Mamba and for bench-194m Falcon (paged KV cache, fused native decode step where it applies), both
   through falconlm's engine, the median of ``--context-steps`` decode steps after one prefill: a token costs the
   same at any context for Mamba, and grows with the context for attention;
3. the recurrent state one sequence holds (bytes, fixed) against Falcon's KV cache at each context.

    python benchmarks/bench_mamba.py [--threads 2] [--dtypes float32 bfloat16] [--contexts 128 1024 4096 8192]
                                     [--context-dtype bfloat16] [--skip-transformers] [--tiny] [--out bench-out]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_core

SHAPES = {
    "200m": dict(hidden_size=1024, num_hidden_layers=20, state_size=16, time_step_rank=64, vocab_size=65024),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, state_size=8, time_step_rank=8, vocab_size=1000),
}


def mamba_folder(out: Path, shape: str) -> Path:
    """A random Falcon-Mamba checkpoint of ``shape``, written once by transformers (so it is its layout)."""
    import torch
    import transformers

    folder = out / f"bench-mamba-{shape}"
    if (folder / "config.json").is_file():
        return folder
    print(f"  writing the random Falcon-Mamba {shape} checkpoint to {folder} ...", file=sys.stderr)
    torch.manual_seed(0)
    config = transformers.FalconMambaConfig(**SHAPES[shape], expand=2, conv_kernel=4, tie_word_embeddings=True)
    transformers.FalconMambaForCausalLM(config).save_pretrained(folder)
    return folder


def _no_text():
    class NoText:  # token ids only: the benchmark measures the engine, not detokenization
        eos_token_id = None

        def decode(self, ids, skip_special_tokens=False):
            return ""

    return NoText()


def _engine(model, max_tokens_per_step: int, max_model_len: int | None = None):
    from falconlm.engine.engine import Engine, EngineConfig

    config = EngineConfig(
        max_num_seqs=8,
        max_num_batched_tokens=max_tokens_per_step,
        enable_prefix_caching=False,
        max_model_len=max_model_len,
    )
    return Engine(model, _no_text(), config)


def _generate(engine, ids, new_tokens: int) -> None:
    from falconlm.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    outs = engine.generate(ids.tolist(), [params] * ids.shape[0])
    assert all(len(o.token_ids) == new_tokens for o in outs)


def throughput(impl: str, folder: Path, dtype, prefill: int, new_tokens: int) -> dict:
    """Prefill tok/s and decode tok/s at batch 1 and 8 for ``impl`` (falconlm or transformers) in ``dtype``."""
    import torch

    gen = torch.Generator().manual_seed(0)
    if impl == "falconlm":
        from falconlm.model.formats import load_pretrained

        model = load_pretrained(folder, dtype, "cpu")
        engine = _engine(model, max(prefill, 512))

        def run_prefill(ids):
            _generate(engine, ids, 1)

        def run_decode(ids):
            _generate(engine, ids, new_tokens)
    else:
        import transformers

        model = transformers.FalconMambaForCausalLM.from_pretrained(folder, dtype=dtype).eval()

        def run_prefill(ids):
            model(ids, use_cache=False, logits_to_keep=1)

        def run_decode(ids):
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            assert out.shape[1] == ids.shape[1] + new_tokens

    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, prefill), generator=gen)
    run_prefill(prompt)  # warm-up at the measured shape
    prefill_s = bench_core.best_time(lambda: run_prefill(prompt), repeats=2)
    row = {"impl": impl, "dtype": str(dtype).removeprefix("torch."), "prefill_tok_s": prefill / prefill_s}
    for batch in (1, 8):
        ids = torch.randint(0, vocab, (batch, bench_core.PROMPT_DECODE), generator=gen)
        if batch == 1:
            run_decode(ids[:, :4])
        row[f"decode_b{batch}_tok_s"] = batch * new_tokens / bench_core.best_time(lambda ids=ids: run_decode(ids))
    row["weights_mib"] = bench_core.stored_bytes(model) / 2**20
    return row


def decode_vs_context(model, contexts: list[int], steps: int) -> list[float]:
    """Milliseconds per decoded token at batch 1 after each context length (engine, greedy): the median time of
    ``steps`` decode steps that follow the prompt's prefill (one prefill per context)."""
    import statistics

    import torch

    from falconlm.engine.sampling_params import SamplingParams

    longest = max(contexts) + steps + 8
    if hasattr(model.config, "state_size"):  # Mamba: no position limit, the config's default is only a default
        model.config.max_position_embeddings = max(model.config.max_position_embeddings, longest)
    engine = _engine(model, 512, longest)
    gen = torch.Generator().manual_seed(1)
    _generate(engine, torch.randint(0, model.config.vocab_size, (1, 16), generator=gen), 4)  # warm-up
    out = []
    for i, context in enumerate(contexts):
        ids = torch.randint(0, model.config.vocab_size, (context,), generator=gen).tolist()
        engine.add_request(f"context-{i}", ids, SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True))
        step_ms, produced = [], 0
        while engine.has_unfinished():
            start = time.perf_counter()
            outs = engine.step()
            elapsed = time.perf_counter() - start
            if produced:  # a step after the first token: a pure decode step
                step_ms.append(1000 * elapsed)
            produced += sum(len(o.token_ids) for o in outs)
        out.append(statistics.median(step_ms) if step_ms else float("nan"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=("float32", "bfloat16"))
    parser.add_argument("--context-dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096, 8192])
    parser.add_argument("--context-steps", type=int, default=32, help="decoded tokens per context measurement")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="a toy shape and sizes: check that the script runs")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    if args.tiny:
        args.prefill, args.new_tokens, args.contexts, args.context_steps = 32, 4, [16, 64], 4
    import torch

    from falconlm.engine.recurrent_engine import state_bytes_per_sequence
    from falconlm.model.formats import load_pretrained

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    shape = "tiny" if args.tiny else "200m"
    args.out.mkdir(parents=True, exist_ok=True)
    folder = mamba_folder(args.out, shape)
    impls = ["falconlm"] if args.skip_transformers else ["transformers", "falconlm"]
    rows = []
    for dtype_name in args.dtypes:
        for impl in impls:
            start = time.perf_counter()
            rows.append(throughput(impl, folder, getattr(torch, dtype_name), args.prefill, args.new_tokens))
            print(f"  measured {impl} {dtype_name} in {time.perf_counter() - start:.0f} s", file=sys.stderr)

    dtype = getattr(torch, args.context_dtype)
    mamba = load_pretrained(folder, dtype, "cpu")
    falcon = _context_falcon(dtype, max(args.contexts) + args.context_steps + 8, args.tiny)
    contexts = {
        "falcon-mamba": decode_vs_context(mamba, args.contexts, args.context_steps),
        "falcon (bench-194m)": decode_vs_context(falcon, args.contexts, args.context_steps),
    }
    result = {
        "shape": shape,
        "parameters": mamba.num_parameters(),
        "threads": args.threads,
        "throughput": rows,
        "context_dtype": args.context_dtype,
        "contexts": args.contexts,
        "decode_ms_per_token": contexts,
        "state_bytes_per_sequence": state_bytes_per_sequence(mamba),
        "falcon_kv_bytes_per_token": falcon.config.kv_cache_bytes_per_token(dtype.itemsize),
    }
    (args.out / f"bench-mamba-{shape}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))


def _context_falcon(dtype, max_len: int, tiny: bool):
    """bench-194m Falcon (Falcon-7B layout) with random weights, in memory, its context ``max_len`` tokens; a toy
    shape of it for ``--tiny``. Only its speed is measured, so no checkpoint is written."""
    from falconlm.model.config import preset
    from falconlm.model.falcon import FalconForCausalLM

    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4) if tiny else {}
    model = FalconForCausalLM(preset("bench-194m", max_position_embeddings=max_len, **small))
    model.init_weights(seed=0)
    return model.to(dtype).eval()


def render(r: dict) -> str:
    lines = [
        f"Falcon-Mamba {r['shape']} ({r['parameters'] / 1e6:.0f}M parameters), {r['threads']} threads",
        "",
        "| dtype | impl | prefill tok/s | decode b1 tok/s | decode b8 tok/s | weights MiB |",
        "|---|---|---|---|---|---|",
    ]
    keys = ("prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s")
    for dtype in dict.fromkeys(row["dtype"] for row in r["throughput"]):
        by_impl = {row["impl"]: row for row in r["throughput"] if row["dtype"] == dtype}
        for row in by_impl.values():
            lines.append(
                f"| {dtype} | {row['impl']} | {row['prefill_tok_s']:.0f} | {row['decode_b1_tok_s']:.1f} | "
                f"{row['decode_b8_tok_s']:.1f} | {row['weights_mib']:.0f} |"
            )
        if {"falconlm", "transformers"} <= by_impl.keys():
            ours, theirs = by_impl["falconlm"], by_impl["transformers"]
            ratios = " | ".join(f"{ours[k] / theirs[k]:.2f}x" for k in keys)
            lines.append(f"| {dtype} | ratio falconlm/transformers | {ratios} | |")
    lines += [
        "",
        f"decode ms per token at batch 1 after a context of N tokens (falconlm engine, {r['context_dtype']}):",
        "",
        "| model | " + " | ".join(str(c) for c in r["contexts"]) + " |",
        "|---|" + "---|" * len(r["contexts"]),
    ]
    for name, values in r["decode_ms_per_token"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    kv = r["falcon_kv_bytes_per_token"]
    lines += [
        "",
        f"state per sequence ({r['context_dtype']}): Falcon-Mamba {r['state_bytes_per_sequence'] / 2**20:.2f} MiB "
        "at any context; bench-194m Falcon KV cache "
        + ", ".join(f"{kv * c / 2**20:.2f} MiB at {c}" for c in r["contexts"]),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
