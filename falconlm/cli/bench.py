"""``falconlm bench serve``: load an OpenAI-compatible completions server and report TTFT, TPOT, ITL, throughput."""

from __future__ import annotations

import argparse
import json
import math

from .options import positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks: `bench serve` loads a running server",
        description="Benchmarks.",
    )
    kinds = p.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    s = kinds.add_parser(
        "serve",
        help="load an OpenAI-compatible /v1/completions server with streaming requests",
        description=(
            "Send streaming completion requests to a running server and report TTFT, TPOT, ITL and end-to-end "
            "latency (mean, median, p99) and request, output-token and total-token throughput (vLLM's definitions)."
        ),
    )
    s.add_argument(
        "--url", required=True, metavar="URL", help="server root (http://127.0.0.1:8000) or its /v1/completions URL"
    )
    load = s.add_mutually_exclusive_group()
    load.add_argument(
        "--concurrency",
        metavar="N",
        type=positive_int,
        default=None,
        help="closed loop with N clients (default: 1 client)",
    )
    load.add_argument(
        "--request-rate",
        metavar="R",
        type=_positive_float,
        default=None,
        help="open loop: Poisson arrivals at R requests/s (inf)",
    )
    s.add_argument("--num-requests", metavar="N", type=positive_int, default=64, help="requests to send (default 64)")
    s.add_argument(
        "--prompt-len",
        metavar="L",
        type=positive_int,
        default=128,
        help="prompt length in tokens, about (default 128)",
    )
    s.add_argument(
        "--max-tokens", metavar="M", type=positive_int, default=128, help="max_tokens of each request (default 128)"
    )
    s.add_argument(
        "--model", metavar="NAME", default=None, help="model name to send (default: the first of GET /v1/models)"
    )
    s.add_argument("--api-key", metavar="KEY", default=None, help="sent as Authorization: Bearer KEY")
    s.add_argument("--seed", metavar="S", type=int, default=0, help="seed for prompts and arrival times (default 0)")
    s.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    s.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from ..bench.serve_client import run_benchmark

    result = run_benchmark(
        args.url,
        concurrency=None if args.request_rate is not None else (args.concurrency or 1),
        request_rate=args.request_rate,
        num_requests=args.num_requests,
        prompt_len=args.prompt_len,
        max_tokens=args.max_tokens,
        model=args.model,
        api_key=args.api_key,
        seed=args.seed,
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    if result.completed == 0:
        common = next(iter(result.errors()), "unknown error")
        raise ValueError(f"all {result.failed} requests failed; most common error: {common}")
    return 0


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or inf, got {text!r}") from None
    if math.isnan(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value
