"""Structured output's decode overhead: tok/s with a JSON-schema constraint against unconstrained decoding, same
model, same prompts, same run.

Models: the embedded default model (vocab 4,096) and, when ../shared/data/falcon-tokenizer is present, a random
bench-194m model (benchmarks/bench_core.py's shape, vocab 65,024) built in memory with the real Falcon tokenizer.
Each row decodes ``--tokens`` tokens for ``--batch`` prompts at once; decode tok/s is
``batch * (tokens - 1) / (time(tokens) - time(1))``, so prefill and the first token cancel out. The constraint
is a JSON schema (an array of objects with an enum, an integer and a string) whose ``minItems`` keeps it open for
the whole run, so every constrained row decodes exactly ``--tokens`` tokens, as the unconstrained ones do with
``ignore_eos``; the grammar is compiled in a warm-up run (its cold compile time is reported apart).

Run: ``python benchmarks/bench_structured_output.py [--models default bench-194m] [--batch 1 8] [--tokens 64]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import SHARED_TOKENIZER

from falconlm.engine.engine import Engine, EngineConfig
from falconlm.engine.sampling_params import SamplingParams, StructuredOutputParams

SCHEMA = {
    "type": "array",
    "minItems": 10000,  # never complete within the run: every row decodes all its tokens
    "items": {
        "type": "object",
        "properties": {
            "kind": {"enum": ["invoice", "receipt", "contract"]},
            "amount": {"type": "integer"},
            "party": {"type": "string"},
        },
        "required": ["kind", "amount", "party"],
    },
}
PROMPT = "Once upon a time, in a small town by the sea, there lived an old fisherman who"


def build_engine(name: str, tokenizer_dir: Path, max_num_seqs: int) -> Engine:
    """The engine of a benchmark model: ``default`` (embedded) or ``bench-194m`` (random, in memory)."""
    from falconlm.default_model import default_model_path
    from falconlm.model.falcon import FalconForCausalLM
    from falconlm.tokenizer import Tokenizer

    config = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=1024)
    if name == "default":
        path = default_model_path()
        model = FalconForCausalLM.from_pretrained(path, dtype=torch.float32)
        return Engine(model.eval(), Tokenizer.from_pretrained(path), config)
    from bench_core import model_config

    torch.manual_seed(0)
    model = FalconForCausalLM(model_config("194m"))
    model.init_weights(seed=0)
    return Engine(model.eval(), Tokenizer.from_pretrained(tokenizer_dir), config)


def timed_run(engine: Engine, batch: int, tokens: int, constraint: StructuredOutputParams | None) -> float:
    prompt = engine.tokenizer.encode(PROMPT)
    params = [
        SamplingParams(max_tokens=tokens, temperature=0.8, seed=i, ignore_eos=True, structured_output=constraint)
        for i in range(batch)
    ]
    start = time.perf_counter()
    outputs = engine.generate([prompt] * batch, params)
    seconds = time.perf_counter() - start
    if any(len(out.token_ids) != tokens for out in outputs):
        raise AssertionError(f"a row stopped early: {[len(o.token_ids) for o in outputs]}")
    return seconds


def decode_tok_s(
    engine: Engine, batch: int, tokens: int, constraint: StructuredOutputParams | None, repeat: int
) -> float:
    """Best of ``repeat`` runs each way (other load on the machine only ever slows a run down)."""
    timed_run(engine, batch, min(tokens, 4), constraint)  # warm-up (and the grammar's compile)
    first = min(timed_run(engine, batch, 1, constraint) for _ in range(repeat))
    full = min(timed_run(engine, batch, tokens, constraint) for _ in range(repeat))
    return batch * (tokens - 1) / max(full - first, 1e-9)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=["default", "bench-194m"], choices=["default", "bench-194m"])
    parser.add_argument("--batch", nargs="*", type=int, default=[1, 8])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokenizer", type=Path, default=SHARED_TOKENIZER, help="Falcon tokenizer for bench-194m")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    constraint = StructuredOutputParams(json_schema=SCHEMA)
    print(f"decode tok/s over {args.tokens} tokens, {torch.get_num_threads()} threads")
    print("| model | vocab | batch | compile ms | unconstrained tok/s | json_schema tok/s | overhead |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        if name == "bench-194m" and not (args.tokenizer / "tokenizer.json").is_file():
            print(f"| {name} | skipped: no Falcon tokenizer at {args.tokenizer} | | | | | |")
            continue
        engine = build_engine(name, args.tokenizer, max(args.batch))
        engine.grammars.compile(StructuredOutputParams(regex="warm"))  # reads the vocabulary (once per engine)
        start = time.perf_counter()
        engine.grammars.compile(constraint)
        compile_ms = 1e3 * (time.perf_counter() - start)
        for batch in args.batch:
            free = decode_tok_s(engine, batch, args.tokens, None, args.repeat)
            constrained = decode_tok_s(engine, batch, args.tokens, constraint, args.repeat)
            overhead = 100 * (free / constrained - 1)
            vocab = engine.model.config.vocab_size
            cells = [name, vocab, batch, f"{compile_ms:.1f}", f"{free:.1f}", f"{constrained:.1f}", f"{overhead:+.1f}%"]
            print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
