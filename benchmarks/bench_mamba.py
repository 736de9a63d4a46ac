"""Falcon-Mamba benchmark: falconlm against transformers on the same random Falcon-Mamba-style checkpoint, same run,
and decode speed against context length beside an attention model (bench-194m Falcon).

Shape ``200m``: hidden 1024, 20 Mamba-1 layers (intermediate 2048, state 16, conv 4, Δ rank 64), vocab 65024,
tied head, B/C/Δ norms (Falcon-Mamba): about 200M parameters, like bench-194m. ``--tiny`` runs a toy shape to prove
the script works.

Measured (float32 or bfloat16, ``--dtype``):

1. prefill of a ``--prefill``-token prompt (tok/s), greedy decode of ``--new-tokens`` at batch 1 and batch 8 (tok/s),
   falconlm's engine against transformers' ``FalconMambaForCausalLM.generate`` (on CPU transformers runs its
   sequential torch scan: the CUDA kernels are not there);
2. per-token decode time at batch 1 after contexts of ``--contexts`` tokens, for this Mamba and for bench-194m
   Falcon (paged KV cache, fused native decode step where it applies; its context is 2048 at most), both through
   falconlm's engine: a token
   costs the same at any context for Mamba, and grows with the context for attention;
3. the recurrent state one sequence holds (bytes, fixed) against Falcon's KV cache at each context.

    python benchmarks/bench_mamba.py [--threads 2] [--dtype float32|bfloat16] [--contexts 128 512 1536]
                                     [--skip-transformers] [--tiny] [--out bench-out]
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


def _engine(model, max_tokens_per_step: int):
    from falconlm.engine.engine import Engine, EngineConfig

    config = EngineConfig(max_num_seqs=8, max_num_batched_tokens=max_tokens_per_step, enable_prefix_caching=False)
    return Engine(model, _no_text(), config)


def _generate(engine, ids, new_tokens: int) -> None:
    from falconlm.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    outs = engine.generate(ids.tolist(), [params] * ids.shape[0])
    assert all(len(o.token_ids) == new_tokens for o in outs)


def throughput(impl: str, folder: Path, dtype, prefill: int, new_tokens: int) -> dict:
    """Prefill tok/s and decode tok/s at batch 1 and 8 for ``impl`` (falconlm or transformers)."""
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

        model = transformers.FalconMambaForCausalLM.from_pretrained(folder, torch_dtype=dtype).eval()

        def run_prefill(ids):
            model(ids, use_cache=False, logits_to_keep=1)

        def run_decode(ids):
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            assert out.shape[1] == ids.shape[1] + new_tokens

    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, prefill), generator=gen)
    run_prefill(prompt)  # warm-up at the measured shape
    row = {"impl": impl, "prefill_tok_s": prefill / bench_core.best_time(lambda: run_prefill(prompt), repeats=2)}
    for batch in (1, 8):
        ids = torch.randint(0, vocab, (batch, bench_core.PROMPT_DECODE), generator=gen)
        if batch == 1:
            run_decode(ids[:, :4])
        row[f"decode_b{batch}_tok_s"] = batch * new_tokens / bench_core.best_time(lambda ids=ids: run_decode(ids))
    row["weights_mib"] = bench_core.stored_bytes(model) / 2**20
    return row


def decode_vs_context(model, contexts: list[int], steps: int) -> list[float]:
    """Milliseconds per decoded token at batch 1 after each context length (engine, greedy): the time of
    ``steps + 1`` tokens less the time of 1 (the prefill and its token), over ``steps``."""
    import torch

    engine = _engine(model, 512)
    gen = torch.Generator().manual_seed(1)
    out = []
    for context in contexts:
        ids = torch.randint(0, model.config.vocab_size, (1, context), generator=gen)
        _generate(engine, ids, 2)  # warm-up
        first = bench_core.best_time(lambda ids=ids: _generate(engine, ids, 1), repeats=2)
        total = bench_core.best_time(lambda ids=ids: _generate(engine, ids, steps + 1), repeats=2)
        out.append(1000 * max(total - first, 0.0) / steps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 1536])
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
    dtype = getattr(torch, args.dtype)
    shape = "tiny" if args.tiny else "200m"
    args.out.mkdir(parents=True, exist_ok=True)
    folder = mamba_folder(args.out, shape)
    impls = ["falconlm"] if args.skip_transformers else ["transformers", "falconlm"]
    rows = []
    for impl in impls:
        start = time.perf_counter()
        rows.append(throughput(impl, folder, dtype, args.prefill, args.new_tokens))
        print(f"  measured {impl} in {time.perf_counter() - start:.0f} s", file=sys.stderr)

    mamba = load_pretrained(folder, dtype, "cpu")
    falcon = _tiny_falcon(dtype) if args.tiny else _bench_falcon(args.out, dtype)
    contexts = {
        "falcon-mamba": decode_vs_context(mamba, args.contexts, args.context_steps),
        "falcon (bench-194m)": decode_vs_context(falcon, args.contexts, args.context_steps),
    }
    state_bytes = state_bytes_per_sequence(mamba)
    kv_per_token = falcon.config.kv_cache_bytes_per_token(dtype.itemsize)
    result = {
        "shape": shape,
        "parameters": mamba.num_parameters(),
        "dtype": args.dtype,
        "threads": args.threads,
        "throughput": rows,
        "contexts": args.contexts,
        "decode_ms_per_token": contexts,
        "state_bytes_per_sequence": state_bytes,
        "falcon_kv_bytes_per_token": kv_per_token,
    }
    (args.out / f"bench-mamba-{shape}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))


def _bench_falcon(out: Path, dtype):
    from falconlm.model.formats import load_pretrained

    folder = bench_core.make_checkpoint(bench_core.checkpoint_folder(out, "194m"), "194m")
    return load_pretrained(folder, dtype, "cpu")


def _tiny_falcon(dtype):
    """A toy Falcon-7B-layout model in memory, for ``--tiny`` (no 194M checkpoint written)."""
    from falconlm.model.config import preset
    from falconlm.model.falcon import FalconForCausalLM

    model = FalconForCausalLM(preset("bench-194m", hidden_size=64, num_hidden_layers=2, num_attention_heads=4))
    model.init_weights(seed=0)
    return model.to(dtype).eval()


def render(r: dict) -> str:
    lines = [
        f"Falcon-Mamba {r['shape']} ({r['parameters'] / 1e6:.0f}M parameters), {r['dtype']}, {r['threads']} threads",
        "",
        "| impl | prefill tok/s | decode b1 tok/s | decode b8 tok/s | weights MiB |",
        "|---|---|---|---|---|",
    ]
    for row in r["throughput"]:
        lines.append(
            f"| {row['impl']} | {row['prefill_tok_s']:.0f} | {row['decode_b1_tok_s']:.1f} | "
            f"{row['decode_b8_tok_s']:.1f} | {row['weights_mib']:.0f} |"
        )
    by_impl = {row["impl"]: row for row in r["throughput"]}
    if {"falconlm", "transformers"} <= by_impl.keys():
        ours, theirs = by_impl["falconlm"], by_impl["transformers"]
        ratios = [ours[k] / theirs[k] for k in ("prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s")]
        lines.append("| ratio falconlm/transformers | " + " | ".join(f"{x:.2f}x" for x in ratios) + " | |")
    lines += [
        "",
        "decode ms per token at batch 1 after a context of N tokens (falconlm engine):",
        "",
        "| model | " + " | ".join(str(c) for c in r["contexts"]) + " |",
        "|---|" + "---|" * len(r["contexts"]),
    ]
    for name, values in r["decode_ms_per_token"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    kv = r["falcon_kv_bytes_per_token"]
    lines += [
        "",
        f"state per sequence: Falcon-Mamba {r['state_bytes_per_sequence'] / 2**20:.2f} MiB at any context; "
        "bench-194m Falcon KV cache " + ", ".join(f"{kv * c / 2**20:.2f} MiB at {c}" for c in r["contexts"]),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
