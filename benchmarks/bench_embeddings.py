"""Embeddings benchmark: falconlm's ``LLM.embed`` against transformers on the same random checkpoint, same run,
same pooling (last token after ``ln_f``, L2-normalised).

For each (batch size, input length) it times embedding ``batch`` random inputs of ``length`` tokens, best of
``--repeats`` after a warm-up, and reports embeddings/s and input tokens/s for both, their ratio, and the largest
difference between the two implementations' vectors (a sanity check: they must agree). transformers runs
``FalconModel`` on the whole batch at once (inputs of equal length need no padding); falconlm runs the inputs as
engine embedding requests, packed into steps of ``--max-num-batched-tokens`` tokens.

A second table shows the two kinds of traffic sharing the engine: one greedy generation's time per output token
alone, then beside a backlog of embedding inputs added with it, and the embedding tokens/s done meanwhile (the
engine gives embeddings what generation leaves of each step's budget, at least a quarter of it).

    python benchmarks/bench_embeddings.py [--model-size 194m|1b] [--threads 2] [--dtype float32|bfloat16]
                                          [--shapes 1x128 16x128 64x32] [--out bench-out]
    python benchmarks/bench_embeddings.py --tiny   # a two-layer toy model, to check that the script runs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_core

DEFAULT_SHAPES = ("1x128", "16x128", "64x32")


def parse_shape(text: str) -> tuple[int, int]:
    """``BATCHxLENGTH`` -> (batch, length)."""
    try:
        batch, length = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BATCHxLENGTH like 16x128, got {text!r}") from None
    if batch < 1 or length < 1:
        raise argparse.ArgumentTypeError(f"batch and length must be >= 1, got {text!r}")
    return batch, length


def tiny_checkpoint(folder: Path) -> Path:
    """A two-layer, hidden-64 model of the benchmark layout: for checking the script, not for numbers."""
    import torch

    from falconlm.model.config import preset
    from falconlm.model.falcon import FalconForCausalLM

    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        model = FalconForCausalLM(
            preset("bench-194m", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=1024)
        )
        model.init_weights(seed=0)
        model.save_pretrained(folder)
    return folder


def time_best(fn, repeats: int) -> tuple[float, object]:
    """(the fastest of ``repeats`` calls after one warm-up, in seconds; the last result)."""
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def decode_beside_backlog(engine, prompt: list[int], new_tokens: int, backlog: list[list[int]]) -> dict:
    """One greedy generation of ``new_tokens`` after ``prompt``, with ``backlog`` embedding inputs queued at the
    same time: seconds per output token after the first, and the embedding tokens finished meanwhile."""
    from falconlm import PoolingParams, SamplingParams

    greedy = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine.add_request("gen", prompt, greedy)
    for i, ids in enumerate(backlog):
        engine.add_request(f"bg{i}", ids, PoolingParams())
    token_times: list[float] = []
    embedded = 0
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.embedding is not None:
                embedded += len(backlog[int(out.request_id[2:])]) if len(token_times) < new_tokens else 0
            elif out.token_ids:
                token_times.append(now)
    span = token_times[-1] - token_times[0]
    return {"s_per_token": span / (len(token_times) - 1), "embedding_tokens_s": embedded / span if span else 0.0}


def run_mixed(llm, args: argparse.Namespace) -> list[dict]:
    """The generation alone, then beside backlogs of embedding inputs (the second table)."""
    import torch

    gen = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, llm.config.vocab_size, (args.mixed_prompt,), generator=gen).tolist()
    batch, length = args.mixed_backlog
    backlog = torch.randint(0, llm.config.vocab_size, (batch, length), generator=gen).tolist()
    decode_beside_backlog(llm.engine, prompt, 4, [])  # warm-up
    rows = []
    for name, inputs in (("alone", []), (f"beside {batch}x{length} embedding inputs", backlog)):
        row = decode_beside_backlog(llm.engine, prompt, args.mixed_tokens, inputs)
        rows.append({"case": name, **row})
        print(f"  decode {name}: {row['s_per_token'] * 1e3:.1f} ms/token", file=sys.stderr)
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from transformers import FalconModel

    from falconlm import LLM

    torch.set_num_threads(args.threads)
    if args.tiny:
        folder = tiny_checkpoint(args.out / "bench-tiny")
    else:
        folder = bench_core.make_checkpoint(bench_core.checkpoint_folder(args.out, args.model_size), args.model_size)
    dtype = getattr(torch, args.dtype)
    longest = max(length for _, length in args.shapes)
    llm = LLM(folder, dtype=args.dtype, max_num_batched_tokens=args.max_num_batched_tokens, pooling="last",
              normalize=True, max_num_seqs=2, max_model_len=max(longest, args.mixed_prompt + args.mixed_tokens, 16),
              skip_tokenizer_init=True)  # fmt: skip
    reference = FalconModel.from_pretrained(folder, torch_dtype=dtype).eval()
    vocab = llm.config.vocab_size
    rows = []
    for batch, length in args.shapes:
        ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(batch * 1000 + length))
        prompts = ids.tolist()

        def ours(prompts=prompts) -> torch.Tensor:
            return torch.tensor([out.embedding for out in llm.embed(prompts)])

        def theirs(ids=ids) -> torch.Tensor:
            with torch.no_grad():
                return F.normalize(reference(ids).last_hidden_state[:, -1].float(), dim=-1)

        ours_s, ours_vectors = time_best(ours, args.repeats)
        theirs_s, theirs_vectors = time_best(theirs, args.repeats)
        diff = (ours_vectors - theirs_vectors).abs().max().item()
        for impl, seconds in (("falconlm", ours_s), ("transformers", theirs_s)):
            rows.append(
                {
                    "impl": impl,
                    "batch": batch,
                    "length": length,
                    "seconds": seconds,
                    "embeddings_s": batch / seconds,
                    "tokens_s": batch * length / seconds,
                    "max_abs_diff": diff,
                }
            )
        print(f"  {batch}x{length}: falconlm {ours_s:.3f}s, transformers {theirs_s:.3f}s", file=sys.stderr)
    return rows, run_mixed(llm, args)


def render_mixed(rows: list[dict]) -> str:
    """The second table: decode speed alone and beside an embedding backlog."""
    lines = ["| generation | ms per output token | embedding tokens/s meanwhile |", "|---|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['case']} | {row['s_per_token'] * 1e3:.1f} | {row['embedding_tokens_s']:.0f} |")
    return "\n".join(lines)


def render(rows: list[dict], title: str) -> str:
    """A markdown table: each shape's two rows and the falconlm/transformers ratio."""
    lines = [
        f"Embeddings, {title}",
        "",
        "| batch x length | impl | embeddings/s | tokens/s | max abs diff |",
        "|---|---|---:|---:|---:|",
    ]
    by_shape: dict[tuple[int, int], dict[str, dict]] = {}
    for row in rows:
        by_shape.setdefault((row["batch"], row["length"]), {})[row["impl"]] = row
    for (batch, length), impls in by_shape.items():
        for impl in ("falconlm", "transformers"):
            row = impls[impl]
            lines.append(
                f"| {batch}x{length} | {impl} | {row['embeddings_s']:.1f} | {row['tokens_s']:.0f} | "
                f"{row['max_abs_diff']:.1e} |"
            )
        ratio = impls["falconlm"]["tokens_s"] / impls["transformers"]["tokens_s"]
        lines.append(f"| {batch}x{length} | ratio falconlm/transformers | {ratio:.2f}x | {ratio:.2f}x | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench_core.add_common_args(parser)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=[parse_shape(s) for s in DEFAULT_SHAPES])
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a toy model, to check the script runs")
    parser.add_argument("--mixed-prompt", type=int, default=64, help="the generation's prompt length")
    parser.add_argument("--mixed-tokens", type=int, default=32, help="the generation's output tokens")
    parser.add_argument("--mixed-backlog", type=parse_shape, default=(256, 64), help="embedding inputs beside it")
    args = parser.parse_args(argv)
    bench_core.apply_isa(args.isa)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, mixed = run(args)
    size = "tiny (hidden 64, 2 layers)" if args.tiny else bench_core.describe(args.model_size)
    title = f"{size}, {args.dtype}, {args.threads} threads, best of {args.repeats}"
    print(render(rows, title))
    print()
    print(render_mixed(mixed))
    result = {"title": title, "rows": rows, "mixed": mixed}
    (args.out / "bench_embeddings.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
