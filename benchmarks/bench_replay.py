"""The serving load of ``bench_serve.py`` (and ``bench_llamacpp.py --serve``) through the Engine alone.

No HTTP server, no tokenizer, no load generator: a closed loop keeps ``--concurrency`` requests in flight and
adds the next prompt as soon as one finishes. The same prompts are used (random token ids, ``--prompt-len``
each). Every request decodes exactly ``--max-tokens`` tokens, greedy, with EOS ignored. It reports:

- output tokens/s;
- the time of the steps that carry prompt chunks apart from the decode-only steps;
- the weight multiply-adds per second and their share of the float32 FMA peak, measured in the same run.

Compared with the served figure, it shows what HTTP and the client cost, and whether prompts or decode steps
dominate.

    python benchmarks/bench_replay.py [--model-size 194m|1b] [--quantize int8|int4-g64] [--isa avx2-base]
                                      [--threads 2] [--num-requests 48] [--concurrency 16] [--prompt-len 200]
                                      [--max-tokens 128] [--max-num-batched-tokens 128]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import (
    add_common_args,
    apply_isa,
    checkpoint_folder,
    describe,
    fma_line,
    fma_peak,
    make_checkpoint,
    served_weight_rate,
    weight_macs_per_token,
)


@dataclass
class ReplayResult:
    """What one replay did: output tokens, wall seconds, and per kind of step ("prompt" / "decode") its count and
    seconds."""

    requests: int
    prompt_tokens: int
    output_tokens: int
    seconds: float
    steps: dict[str, list[float]] = field(default_factory=lambda: {"prompt": [0, 0.0], "decode": [0, 0.0]})
    most_in_flight: int = 0


def replay(engine, prompts: list[list[int]], concurrency: int, max_tokens: int) -> ReplayResult:
    """Run ``prompts`` through ``engine`` with at most ``concurrency`` in flight (a closed loop), each decoding
    ``max_tokens`` greedy tokens with EOS ignored. Steps are timed at the runner, split by whether they carry a
    prompt chunk (any row of more than one token)."""
    from falconlm.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    result = ReplayResult(len(prompts), sum(map(len, prompts)), 0, 0.0)
    execute = engine.runner.execute

    def timed(step):
        start = time.perf_counter()
        out = execute(step)
        kind = "prompt" if any(item.num_tokens > 1 for item in step.scheduled) else "decode"
        result.steps[kind][0] += 1
        result.steps[kind][1] += time.perf_counter() - start
        return out

    engine.runner.execute = timed
    try:
        sent = in_flight = 0

        def add_next() -> None:
            nonlocal sent, in_flight
            engine.add_request(f"replay-{sent}", prompts[sent], params)
            sent += 1
            in_flight += 1
            result.most_in_flight = max(result.most_in_flight, in_flight)

        start = time.perf_counter()
        while sent < min(concurrency, len(prompts)):
            add_next()
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    result.output_tokens += len(out.output.token_ids)
                    in_flight -= 1
                    if sent < len(prompts):
                        add_next()
        result.seconds = time.perf_counter() - start
    finally:
        del engine.runner.execute  # the instance attribute goes; the class's method is back
    return result


def render(result: ReplayResult, args: argparse.Namespace, peak: float | None) -> str:
    per_token = weight_macs_per_token(args.model_size)
    gmac_s, share = served_weight_rate(
        result.prompt_tokens, result.output_tokens, result.requests, result.seconds, per_token, peak
    )
    weights = args.quantize or "bfloat16"
    lines = [
        f"{describe(args.model_size)}, random weights, {weights}, {args.threads} threads; engine only (no HTTP)",
        fma_line(peak, args.threads),
        f"load: {result.requests} requests of {args.prompt_len} prompt tokens, {args.concurrency} in flight, "
        f"{args.max_tokens} greedy tokens each, {args.max_num_batched_tokens}-token steps",
        "",
        "| output tok/s | weight GMAC/s | % of FMA peak | seconds | steps with prompt chunks: n / s / ms each "
        "| decode-only steps: n / s / ms each |",
        "|---:|---:|---:|---:|---|---|",
    ]
    cells = []
    for kind in ("prompt", "decode"):
        count, seconds = result.steps[kind]
        cells.append(f"{count:.0f} / {seconds:.2f} / {1000 * seconds / max(count, 1):.1f}")
    lines.append(
        f"| {result.output_tokens / max(result.seconds, 1e-9):.1f} | {gmac_s:.1f} | {share} | {result.seconds:.2f} "
        f"| {cells[0]} | {cells[1]} |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--quantize", default=None, help="int8 or int4-g64 weights (default: bf16)")
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=128, help="the server's default on AVX2")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name in ("num_requests", "concurrency", "prompt_len", "max_tokens", "max_num_batched_tokens", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    apply_isa(args.isa)

    import bench_serve
    import torch

    from falconlm.engine.factory import EngineArgs, build_engine

    torch.set_num_threads(args.threads)
    folder = make_checkpoint(checkpoint_folder(args.out, args.model_size), args.model_size)
    prompts = bench_serve.make_requests(folder, args.num_requests, args.prompt_len, args.seed)
    engine = build_engine(
        EngineArgs(
            model=folder, dtype="bfloat16", quantize=args.quantize, max_num_seqs=args.concurrency,
            max_num_batched_tokens=args.max_num_batched_tokens, skip_tokenizer_init=True, threads=args.threads,
        )
    )  # fmt: skip
    replay(engine, [prompts[0][:16]], 1, 4)  # warm-up: the kernels are built and touched once
    peak = fma_peak(args.threads)
    print(f"  replaying {len(prompts)} requests through the engine ...", file=sys.stderr)
    print(render(replay(engine, prompts, args.concurrency, args.max_tokens), args, peak))


if __name__ == "__main__":
    main()
