"""Serving benchmark: `falconlm serve` under concurrent streaming clients against transformers at batch 1.

On the random bench-194m checkpoint of bench_core.py (Falcon-7B layout, about 194M parameters), bf16, 2 threads:
1. start `falconlm serve --dtype bfloat16 --max-num-seqs 16` (OMP_NUM_THREADS=threads), wait for /health;
2. 16 clients (closed loop) each send a prompt of 200 random token ids asking for 128 tokens (a random-weights
   model rarely emits EOS; the real output token count is what we report), through falconlm.bench;
3. stop the server, then time transformers' `generate` (greedy, exactly max_tokens new tokens) on the first
   `--reference-requests` of the same prompts one at a time at batch 1, and extrapolate its sequential rate to
   all of them (it would otherwise take minutes);
4. print a markdown table: aggregate output tokens/s of both, their ratio (target >= 6x), TTFT p50/p99, TPOT.

    python benchmarks/bench_serve.py [--num-requests 16] [--concurrency 16] [--prompt-len 200] [--max-tokens 128]
                                     [--threads 2] [--reference-requests 2] [--out bench-out] [--quantize int8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import REPO_ROOT, SHARED_TOKENIZER, make_checkpoint

from falconlm.bench import BenchResult, run_benchmark

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
FIRST_ORDINARY_ID = 12  # Falcon's ids 0-11 are special tokens (11 is <|endoftext|>)


def ensure_tokenizer(folder: Path, source: Path) -> None:
    """The server needs a tokenizer for its text output: copy Falcon's beside the random weights, once."""
    if (folder / "tokenizer.json").is_file():
        return
    if not (source / "tokenizer.json").is_file():
        sys.exit(f"bench_serve: no tokenizer.json in {folder} or {source}; pass --tokenizer DIR")
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)


def make_requests(folder: Path, num: int, prompt_len: int, seed: int) -> list[list[int]]:
    """``num`` prompts of ``prompt_len`` random ordinary token ids: the same requests for both engines."""
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_ORDINARY_ID, vocab) for _ in range(prompt_len)] for _ in range(num)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, port: int, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "falconlm", "serve", "--model", str(folder), "--dtype", "bfloat16"]
    cmd += ["--max-num-seqs", str(args.concurrency), "--host", "127.0.0.1", "--port", str(port)]
    if args.quantize:
        cmd += ["--quantize", args.quantize]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    with log.open("w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll GET /health until 200; stop early when the server process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}:\n{_tail(log)}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not healthy after {timeout:g} s:\n{_tail(log)}")


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds process ``pid`` has used so far, all its threads together (Linux ``/proc``);
    None where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.is_file() else "(no log)"


def measure_falconlm(folder: Path, prompts: list[list[int]], args: argparse.Namespace) -> BenchResult:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = args.out / "bench_serve_server.log"
    proc = start_server(folder, port, args, log)
    try:
        wait_healthy(url, proc, log, args.startup_timeout)
        warm = run_benchmark(url, concurrency=1, num_requests=1, prompts=[prompts[0][:16]], max_tokens=4)
        if warm.failed:
            raise RuntimeError(f"the warm-up request failed: {next(iter(warm.errors()))}\n{_tail(log)}")
        return run_benchmark(
            url, concurrency=args.concurrency, num_requests=len(prompts), prompts=prompts, max_tokens=args.max_tokens
        )
    finally:
        stop_server(proc)


def measure_transformers(folder: Path, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    """Greedy batch-1 generate of exactly max_tokens new tokens for each prompt, one after another."""
    import torch
    from transformers import FalconForCausalLM

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model = FalconForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()

    def generate(ids: list[int], new_tokens: int) -> int:
        x = torch.tensor([ids])
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        return out.shape[1] - x.shape[1]

    generate(prompts[0][:16], 4)  # warm-up
    start, tokens = time.perf_counter(), 0
    for ids in prompts:
        tokens += generate(ids, args.max_tokens)
    seconds = time.perf_counter() - start
    return {"requests_timed": len(prompts), "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


def render(result: BenchResult, ref: dict, args: argparse.Namespace) -> str:
    d = result.to_dict()
    ratio = d["output_throughput"] / ref["tok_s"]
    n = d["num_requests"]
    sequential_s = ref["seconds"] / ref["requests_timed"] * n

    def ms(key: str, stat: str) -> str:
        value = d[key][stat]
        return "-" if value is None else f"{value:.0f}"

    return "\n".join(
        [
            f"bench-194m (Falcon-7B layout, about 194M parameters, random weights), "
            f"{args.quantize + ' weights, ' if args.quantize else ''}bfloat16, {args.threads} threads; "
            f"{n} requests of {args.prompt_len} prompt tokens, max_tokens {args.max_tokens}",
            "",
            "| falconlm serve tok/s | transformers tok/s (batch 1) | ratio (target >= 6x) | TTFT p50 ms "
            "| TTFT p99 ms | TPOT mean ms | TPOT p50 ms |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {d['output_throughput']:.1f} | {ref['tok_s']:.1f} | {ratio:.2f}x | {ms('ttft_ms', 'median')} "
            f"| {ms('ttft_ms', 'p99')} | {ms('tpot_ms', 'mean')} | {ms('tpot_ms', 'median')} |",
            "",
            f"- falconlm serve: {args.concurrency} concurrent streaming clients, {d['completed']} completed, "
            f"{d['failed']} failed, {d['total_output_tokens']} output tokens in {d['duration_s']:.1f} s "
            f"(--max-num-seqs {args.concurrency}).",
            f"- transformers: `generate` greedy with min_new_tokens = max_new_tokens = {args.max_tokens}, batch 1; "
            f"timed {ref['requests_timed']} of the {n} requests ({ref['tokens']} tokens in {ref['seconds']:.1f} s) "
            f"and extrapolated: all {n} one after another would take about {sequential_s:.0f} s.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference-requests", type=int, default=2, help="transformers requests to time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--tokenizer", type=Path, default=SHARED_TOKENIZER, help="copied in when absent")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for /health")
    parser.add_argument("--quantize", default=None, help="serve int8 or int4 weights (transformers stays bf16)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    folder = make_checkpoint(args.out / "bench-194m")
    ensure_tokenizer(folder, args.tokenizer)
    prompts = make_requests(folder, args.num_requests, args.prompt_len, args.seed)

    print(f"  serving {len(prompts)} requests through falconlm serve ...", file=sys.stderr)
    result = measure_falconlm(folder, prompts, args)
    print(result.table(), file=sys.stderr)
    if result.completed == 0:
        sys.exit(f"bench_serve: every request failed: {next(iter(result.errors()))}")
    reference = min(max(args.reference_requests, 1), len(prompts))
    print(f"  timing transformers on {reference} of them ...", file=sys.stderr)
    ref = measure_transformers(folder, prompts[:reference], args)
    (args.out / "bench_serve.json").write_text(json.dumps({"falconlm": result.to_dict(), "transformers": ref}))
    print(render(result, ref, args))


if __name__ == "__main__":
    main()
