"""Tensor parallelism at a fixed thread budget: 1 rank with all the threads against N ranks sharing them.

For each rank count (``--ranks``, default 1 and 2) it launches ``torchrun --nproc-per-node N`` (gloo on CPU, NCCL
with ``--device cuda``); every rank loads its shard with ``falconlm.parallel.load_sharded`` and gets
``--threads / N`` threads, so 1 x 2 threads is compared with 2 x 1 thread. The model runs through its own dense KV
cache (``model(ids, kv_cache=...)``): prefill of a ``--prefill``-token prompt, then greedy decode of
``--new-tokens`` at batch 1 and batch 8. A step's time is the slowest rank's. Reported per rank count: prefill
and decode tok/s, each rank's peak RSS (on CUDA: peak allocated GPU memory), and how many of the batch-1 greedy
tokens equal the 1-rank run's (a parity check, not a timing).

    python benchmarks/bench_tp.py [--model-size 1b] [--threads 2] [--ranks 1 2] [--dtype bfloat16]
                                  [--quantize int8] [--model PATH] [--device cpu|cuda] [--out bench-out]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_core import (
    MODEL_SIZES,
    PROMPT_DECODE,
    checkpoint_folder,
    describe,
    make_checkpoint,
    peak_rss_mib,
    worker_env,
)

DTYPES = ("float32", "bfloat16")


def worker(args: argparse.Namespace) -> None:
    """One rank (under torchrun): load the shard, measure, and (rank 0) write every rank's figures as JSON."""
    import torch
    import torch.distributed as dist

    from falconlm.parallel import init_parallel, load_sharded

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, args.threads // world) if args.device == "cpu" else args.threads)
    torch.set_grad_enabled(False)
    state = init_parallel(world, args.device, timeout_s=args.timeout)
    model = load_sharded(args.model, state, getattr(torch, args.dtype), args.quantize)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def sync() -> None:
        if state.device.type == "cuda":
            torch.cuda.synchronize(state.device)
        if state.distributed:
            dist.barrier()

    def timed(fn) -> tuple[float, object]:
        """The slowest rank's seconds for ``fn`` (every rank runs it), and what ``fn`` returned."""
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=state.device)
        if state.distributed:
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        return float(seconds.item()), out

    def prefill(ids: torch.Tensor) -> None:
        model(ids.to(state.device), kv_cache=model.new_kv_cache(ids.shape[0], ids.shape[1]), last_token_only=True)

    def decode(ids: torch.Tensor) -> list[int]:
        """Greedy: the prompt, then ``new_tokens`` single-token steps; the tokens of row 0."""
        cache = model.new_kv_cache(ids.shape[0], ids.shape[1] + args.new_tokens)
        logits = model(ids.to(state.device), kv_cache=cache, last_token_only=True)
        tokens = []
        for _ in range(args.new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(nxt[0, 0]))
            logits = model(nxt, kv_cache=cache)
        return tokens

    long_prompt = torch.randint(0, vocab, (1, args.prefill), generator=gen)
    prompts = {b: torch.randint(0, vocab, (b, PROMPT_DECODE), generator=gen) for b in (1, 8)}
    prefill(long_prompt)  # warm-up at the measured shapes
    decode(prompts[1][:, :4])
    result: dict = {"ranks": world, "threads_per_rank": torch.get_num_threads(), "device": state.device.type}
    result["prefill_tok_s"] = args.prefill / min(timed(lambda: prefill(long_prompt))[0] for _ in range(args.repeats))
    for batch, ids in prompts.items():
        runs = [timed(lambda ids=ids: decode(ids)) for _ in range(args.repeats)]
        result[f"decode_b{batch}_tok_s"] = batch * args.new_tokens / min(s for s, _ in runs)
        if batch == 1:
            result["tokens_b1"] = runs[0][1]
    mine = torch.cuda.max_memory_allocated(state.device) / 2**20 if state.device.type == "cuda" else peak_rss_mib()
    peaks = [mine]
    if state.distributed:
        peaks = [None] * world
        dist.all_gather_object(peaks, mine)
    result["peak_mib_per_rank"] = peaks
    if state.is_driver:
        Path(args.result).write_text(json.dumps(result))
    if state.distributed:
        dist.barrier()
        dist.destroy_process_group()


def launch(args: argparse.Namespace, ranks: int, result: Path) -> dict:
    """Run :func:`worker` on ``ranks`` processes under torchrun; its JSON figures."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    cmd += [__file__, "--worker", "--result", str(result), "--model", str(args.model), "--dtype", args.dtype]
    cmd += ["--threads", str(args.threads), "--device", args.device, "--prefill", str(args.prefill)]
    cmd += ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--timeout", str(args.timeout)]
    if args.quantize:
        cmd += ["--quantize", args.quantize]
    threads = max(1, args.threads // ranks) if args.device == "cpu" else args.threads
    # A process group of its own, so that a timeout takes the ranks down with torchrun.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=worker_env(threads), start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        sys.exit(f"bench_tp: {ranks} rank(s) did not finish within {args.timeout:.0f} s")
    if proc.returncode != 0:
        sys.exit(f"bench_tp: the {ranks}-rank run failed:\n{err[-3000:]}")
    row = json.loads(result.read_text())
    print(f"  measured {ranks} rank(s): {row['decode_b1_tok_s']:.1f} tok/s at batch 1", file=sys.stderr)
    return row


def render(rows: list[dict], title: str, threads: int, prefill: int) -> str:
    """The table: one row per rank count; parity counts the batch-1 greedy tokens equal to the first row's."""
    reference = rows[0]["tokens_b1"]
    on_gpu = rows[0]["device"] == "cuda"
    lines = [
        f"{title}; " + ("one GPU per rank" if on_gpu else f"{threads} threads in total"),
        "",
        f"| ranks x threads | prefill {prefill} tok/s | decode b1 tok/s | decode b8 tok/s "
        f"| peak {'GPU MiB' if on_gpu else 'RSS MiB'} per rank | b1 tokens = {rows[0]['ranks']} rank |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        same = sum(a == b for a, b in zip(r["tokens_b1"], reference, strict=True))
        peaks = " / ".join(f"{p:.0f}" for p in r["peak_mib_per_rank"])
        lines.append(
            f"| {r['ranks']} x {r['threads_per_rank']} | {r['prefill_tok_s']:.0f} | {r['decode_b1_tok_s']:.1f} | "
            f"{r['decode_b8_tok_s']:.1f} | {peaks} | {same}/{len(reference)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="1b", help="bench_core's random shape")
    parser.add_argument("--model", type=Path, default=None, help="a checkpoint folder instead of the bench shape")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="where bench checkpoints are cached")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in total, split over the ranks")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="rank counts to compare")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--quantize", default=None, help="a falconlm.quant recipe (int8, int4-g64...)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per rank count before giving up")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        from falconlm.parallel.state import exit_rank

        exit_rank(0)  # no interpreter finalization (see exit_rank)
    if any(r < 1 for r in args.ranks) or (args.device == "cpu" and max(args.ranks) > args.threads):
        sys.exit(f"bench_tp: --ranks {args.ranks} must be positive and, on CPU, at most --threads ({args.threads})")
    if args.model is None:
        args.model = make_checkpoint(checkpoint_folder(args.out, args.model_size), args.model_size)
        title = describe(args.model_size)
    else:
        if not (args.model / "config.json").is_file():
            sys.exit(f"bench_tp: {args.model} holds no config.json")
        title = str(args.model)
    title += f", {args.quantize or args.dtype}"
    with tempfile.TemporaryDirectory() as tmp:
        rows = [launch(args, ranks, Path(tmp) / f"tp{ranks}.json") for ranks in args.ranks]
    print(render(rows, title, args.threads, args.prefill))


if __name__ == "__main__":
    main()
