"""Long-context benchmark: falconlm against transformers on one random Falcon-7B-style checkpoint, same run.

The checkpoint is bench-194m-shaped (``--model-size``; ``tiny`` proves the script in seconds) with
``max_position_embeddings`` 2048 and RoPE scaling from its config (``--rope linear:8`` by default: a 16k context),
so 8k prompts run through the scaled rotary path. For each implementation, in a subprocess of its own:

* prefill tok/s of one prompt of each ``--prefill-lengths`` (512, 2048, 8192): falconlm through the engine in
  chunked prefill (``--chunk`` tokens per step), transformers as one forward; best of ``--repeats``;
* decode tok/s at a ``--decode-context`` (8192) context: ``--new-tokens`` greedy steps after that prompt
  (falconlm: engine steps after the first token; transformers: one-token forwards with its cache);
* the KV bytes an 8k context holds (falconlm: K/V groups only, ``config.kv_cache_bytes_per_token``, and the
  pool the engine allocated; transformers: its cache tensors after the prefill), and the worker's peak RSS.

Then prefix caching through the engine: the time to first token of a request of a ``--doc-tokens`` (6144) document
plus a question, cold, then of a second request with the same document and another question (its document blocks
come from the prefix cache), and the tokens the cache served.

    python benchmarks/bench_long_context.py [--model-size 194m|tiny] [--dtype bfloat16|float32] [--threads 2]
        [--rope linear:8|dynamic:8|none] [--prefill-lengths 512 2048 8192] [--decode-context 8192]
        [--new-tokens 32] [--doc-tokens 6144] [--chunk 2048] [--out bench-out]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_core import ISAS, apply_isa, best_time, native_variant, peak_rss_mib, worker_env

MAX_POSITIONS = 2048  # the checkpoint's trained context; scaling stretches it
SIZES = {
    "194m": ({}, "hidden 1024, 12 layers, 16 heads, MQA, vocab 65024"),
    "tiny": (
        {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 1024},
        "hidden 64, 2 layers, 4 heads, MQA, vocab 1024",
    ),
}
QUESTION_TOKENS = 64


def parse_rope(text: str) -> dict | None:
    """``linear:8`` / ``dynamic:4`` -> a config.json rope_scaling object; ``none`` -> None."""
    if text == "none":
        return None
    kind, _, factor = text.partition(":")
    if kind not in ("linear", "dynamic") or not factor:
        raise argparse.ArgumentTypeError(f"--rope must be none, linear:FACTOR or dynamic:FACTOR, got {text!r}")
    return {"type": kind, "factor": float(factor)}


def context_limit(rope: dict | None) -> int:
    return MAX_POSITIONS if rope is None else int(MAX_POSITIONS * rope["factor"])


def make_checkpoint(out: Path, size: str, rope: dict | None) -> Path:
    """A random checkpoint of ``size`` with ``rope`` scaling, written once and reused."""
    import torch

    from falconlm.model.config import RopeScaling, preset
    from falconlm.model.falcon import FalconForCausalLM

    tag = "none" if rope is None else f"{rope['type']}{rope['factor']:g}"
    folder = out / f"bench-long-{size}-{tag}"
    if (folder / "config.json").is_file():
        return folder
    scaling = None if rope is None else RopeScaling(rope["type"], rope["factor"])
    config = preset("bench-194m", max_position_embeddings=MAX_POSITIONS, rope_scaling=scaling, **SIZES[size][0])
    print(f"  writing the random bench-{size} checkpoint ({tag}) to {folder} ...", file=sys.stderr)
    torch.manual_seed(0)
    model = FalconForCausalLM(config)
    model.init_weights(seed=0)
    model.save_pretrained(folder)
    return folder


class _NoText:  # token ids only: the benchmark measures the engine, not detokenization
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=False):
        return ""


def _engine(model, args: argparse.Namespace, prefix_caching: bool):
    from falconlm.engine.engine import Engine, EngineConfig

    longest = max(*args.prefill_lengths, args.decode_context, args.doc_tokens + QUESTION_TOKENS)
    config = EngineConfig(
        max_num_seqs=1,
        max_num_batched_tokens=args.chunk,
        max_model_len=longest + args.new_tokens + 1,
        enable_prefix_caching=prefix_caching,
    )
    return Engine(model, _NoText(), config)


def _timed_request(engine, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, seconds per later token) of one request on an idle engine."""
    from falconlm.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    engine.add_request(f"bench-{start}", prompt, params)
    first = None
    count = 0
    while engine.has_unfinished():
        for out in engine.step():
            count = len(out.output.token_ids)
            if first is None and count:
                first = time.perf_counter()
    end = time.perf_counter()
    return first - start, (end - first) / max(1, count - 1)


def falconlm_worker(args: argparse.Namespace, folder: Path) -> dict:
    import torch

    from falconlm.model.falcon import FalconForCausalLM

    model = FalconForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype))
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    engine = _engine(model, args, prefix_caching=False)
    result: dict = {"impl": "falconlm", "native": native_variant(), "chunk": args.chunk}
    _timed_request(engine, torch.randint(0, vocab, (args.prefill_lengths[0],), generator=gen).tolist(), 1)  # warm
    for n in args.prefill_lengths:
        prompt = torch.randint(0, vocab, (n,), generator=gen).tolist()
        seconds = min(_timed_request(engine, prompt, 1)[0] for _ in range(args.repeats))
        result[f"prefill_{n}_tok_s"] = n / seconds
    prompt = torch.randint(0, vocab, (args.decode_context,), generator=gen).tolist()
    _, per_token = _timed_request(engine, prompt, args.new_tokens + 1)
    result["decode_tok_s"] = 1 / per_token
    cfg = model.config
    itemsize = model.transformer.ln_f.weight.element_size()
    result["kv_bytes_context"] = cfg.kv_cache_bytes_per_token(itemsize) * args.decode_context
    cache = engine.runner.cache
    result["kv_pool_bytes"] = cache.k.nbytes + cache.v.nbytes
    del engine
    # Prefix caching: a document, two questions.
    cached = _engine(model, args, prefix_caching=True)
    document = torch.randint(0, vocab, (args.doc_tokens,), generator=gen).tolist()
    questions = [torch.randint(0, vocab, (QUESTION_TOKENS,), generator=gen).tolist() for _ in range(2)]
    cold, _ = _timed_request(cached, document + questions[0], 1)
    hits_before = cached.kv_cache_manager.num_prefix_hit_tokens
    warm, _ = _timed_request(cached, document + questions[1], 1)
    result |= {
        "ttft_cold_s": cold,
        "ttft_warm_s": warm,
        "prefix_hit_tokens": cached.kv_cache_manager.num_prefix_hit_tokens - hits_before,
    }
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def transformers_worker(args: argparse.Namespace, folder: Path) -> dict:
    import torch
    from transformers import FalconForCausalLM as HFModel

    model = HFModel.from_pretrained(folder, dtype=getattr(torch, args.dtype)).eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    result: dict = {"impl": "transformers"}
    model(torch.randint(0, vocab, (1, args.prefill_lengths[0]), generator=gen), logits_to_keep=1)  # warm-up
    for n in args.prefill_lengths:
        ids = torch.randint(0, vocab, (1, n), generator=gen)
        seconds = best_time(lambda ids=ids: model(ids, logits_to_keep=1), repeats=args.repeats)
        result[f"prefill_{n}_tok_s"] = n / seconds
    ids = torch.randint(0, vocab, (1, args.decode_context), generator=gen)
    out = model(ids, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    result["kv_bytes_context"] = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(args.new_tokens):  # what generate() does per new token: one position, with the cache
        out = model(token, past_key_values=cache, use_cache=True)
        token, cache = out.logits[:, -1:].argmax(-1), out.past_key_values
    result["decode_tok_s"] = args.new_tokens / (time.perf_counter() - start)
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def measure(impl: str, args: argparse.Namespace) -> dict:
    """Run one implementation's worker in a subprocess of its own (its own peak RSS)."""
    cmd = [sys.executable, __file__, "--worker", impl, *_passthrough(args)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(args.threads))
    if done.returncode != 0:
        sys.exit(f"bench_long_context: the {impl} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _passthrough(args: argparse.Namespace) -> list[str]:
    rope = "none" if args.rope is None else f"{args.rope['type']}:{args.rope['factor']:g}"
    out = ["--model-size", args.model_size, "--dtype", args.dtype, "--threads", str(args.threads), "--rope", rope]
    out += ["--prefill-lengths", *map(str, args.prefill_lengths), "--decode-context", str(args.decode_context)]
    out += ["--new-tokens", str(args.new_tokens), "--doc-tokens", str(args.doc_tokens), "--chunk", str(args.chunk)]
    out += ["--repeats", str(args.repeats), "--out", str(args.out)]
    return out + (["--isa", args.isa] if args.isa else [])


def render(rows: list[dict], args: argparse.Namespace) -> str:
    rope = "no scaling" if args.rope is None else f"{args.rope['type']} x{args.rope['factor']:g}"
    native = next((r["native"] for r in rows if "native" in r), None)
    lines = [
        f"bench-{args.model_size} ({SIZES[args.model_size][1]}), {args.dtype}, max_position_embeddings "
        f"{MAX_POSITIONS} with {rope} RoPE scaling, {args.threads} threads"
        + (f", falconlm native kernels: {native}" if native else ""),
        f"falconlm prefill through the engine in chunks of {args.chunk} tokens; transformers as one forward. "
        f"Decode: {args.new_tokens} greedy tokens after a {args.decode_context}-token prompt.",
        "",
        "| impl | "
        + " | ".join(f"prefill {n} tok/s" for n in args.prefill_lengths)
        + f" | decode @{args.decode_context} tok/s | KV bytes @{args.decode_context} | peak RSS MiB |",
        "|---|" + "---:|" * (len(args.prefill_lengths) + 3),
    ]
    for r in rows:
        cells = [f"{r[f'prefill_{n}_tok_s']:.0f}" for n in args.prefill_lengths]
        cells += [f"{r['decode_tok_s']:.1f}", f"{r['kv_bytes_context'] / 2**20:.1f} MiB", f"{r['peak_rss_mib']:.0f}"]
        lines.append(f"| {r['impl']} | " + " | ".join(cells) + " |")
    by_impl = {r["impl"]: r for r in rows}
    if {"falconlm", "transformers"} <= by_impl.keys():
        ours, ref = by_impl["falconlm"], by_impl["transformers"]
        keys = [f"prefill_{n}_tok_s" for n in args.prefill_lengths] + ["decode_tok_s"]
        lines.append(
            "| ratio falconlm/transformers | " + " | ".join(f"{ours[k] / ref[k]:.2f}x" for k in keys) + " | | |"
        )
    ours = by_impl.get("falconlm")
    if ours is not None:
        lines += [
            "",
            f"falconlm KV pool allocated: {ours['kv_pool_bytes'] / 2**20:.1f} MiB (one sequence of the longest "
            "context; K/V groups only, never broadcast to the query heads)",
            "",
            f"Prefix caching (engine): a {args.doc_tokens}-token document + a {QUESTION_TOKENS}-token question",
            "",
            "| request | TTFT s | prompt tokens from the prefix cache |",
            "|---|---:|---:|",
            f"| first (cold) | {ours['ttft_cold_s']:.3f} | 0 |",
            f"| second, same document | {ours['ttft_warm_s']:.3f} | {ours['prefix_hit_tokens']} |",
            f"| speed-up | {ours['ttft_cold_s'] / ours['ttft_warm_s']:.1f}x | |",
        ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-size", choices=sorted(SIZES), default="194m")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--isa", choices=ISAS, default=None, help="force a native kernel variant")
    parser.add_argument("--rope", type=parse_rope, default=parse_rope("linear:8"))
    parser.add_argument("--prefill-lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--decode-context", type=int, default=8192)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--doc-tokens", type=int, default=6144)
    parser.add_argument("--chunk", type=int, default=2048, help="falconlm's prefill tokens per engine step")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--impls", nargs="+", choices=("falconlm", "transformers"), default=["transformers", "falconlm"]
    )
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="where checkpoints are cached")
    parser.add_argument("--worker", choices=("falconlm", "transformers"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    longest = max(*args.prefill_lengths, args.decode_context, args.doc_tokens + QUESTION_TOKENS) + args.new_tokens + 1
    if longest > context_limit(args.rope):
        parser.error(f"{longest} positions exceed the checkpoint's context ({context_limit(args.rope)}); raise --rope")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    apply_isa(args.isa)
    folder = make_checkpoint(args.out, args.model_size, args.rope)
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        torch.set_grad_enabled(False)
        worker = falconlm_worker if args.worker == "falconlm" else transformers_worker
        print(json.dumps(worker(args, folder)))
        return
    rows = []
    for impl in args.impls:
        rows.append(measure(impl, args))
        print(f"  measured {impl}", file=sys.stderr)
    print(render(rows, args))


if __name__ == "__main__":
    main()
