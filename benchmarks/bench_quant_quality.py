"""Quantization quality: perplexity and next-token KL divergence of int8 / int4 against bf16.

On the embedded default model and the held-out TinyStories text (or ``--model`` / ``--data``), every variant
scores the same sliding windows (``falconlm.train.perplexity.windows``: ``--context`` tokens every ``--stride``,
each token scored once, as ``falconlm eval-ppl`` does). Per variant it reports the perplexity, its change
against bf16, the mean KL(p_bf16 || p_variant) of the next-token distributions over the scored tokens (the
scoreboard llama.cpp publishes for its formats) and how often the top-1 token agrees with bf16. Quantized
variants are quantized on load from the checkpoint (head int8 by default) and run in bf16; ``-gptq`` variants are
written by GPTQ first, calibrated on 64 windows of 256 tokens of the TinyStories training text.

    python benchmarks/bench_quant_quality.py [--model PATH] [--data FILE] [--max-tokens N] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import stored_bytes

from falconlm.model.falcon import FalconForCausalLM
from falconlm.quant import QuantRecipe, load_quantized, quantize_checkpoint
from falconlm.quant.gptq import calibration_ids
from falconlm.tokenizer import Tokenizer
from falconlm.train.data import tokenize_file
from falconlm.train.perplexity import windows

SHARED = Path(os.environ.get("FALCONLM_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DATA = SHARED / "data/tinystories/TinyStories-valid-v1.first-794KB.txt"
CALIBRATION = SHARED / "data/tinystories/TinyStories-train-v1.first-2MiB.txt"  # GPTQ's text: training, not held out
VARIANTS = (
    "float32", "bf16", "int8", "int4-g32", "int4-g64", "int4-g128", "int4-g64-sym",
    "int4-g64-gptq", "int4-g128-gptq", "int4-g64-sym-gptq",
)  # fmt: skip
GPTQ_SAMPLES, GPTQ_LENGTH = 64, 256
TARGETS = {"int8": 1.0, "int4-g64": 5.0}  # issue 5: allowed perplexity increase over bf16, in percent


def load(model_path: Path, variant: str, work: Path) -> FalconForCausalLM:
    if variant == "float32":
        return FalconForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if variant == "bf16":
        return FalconForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    if not variant.endswith("-gptq"):
        return load_quantized(model_path, dtype=torch.bfloat16, quantize=QuantRecipe.parse(variant))
    recipe = dataclasses.replace(QuantRecipe.parse(variant.removesuffix("-gptq")), method="gptq")
    tokens = torch.tensor(Tokenizer.from_pretrained(model_path).encode(CALIBRATION.read_text(encoding="utf-8")))
    calibration = calibration_ids(tokens, GPTQ_SAMPLES, GPTQ_LENGTH)
    out = work / variant
    quantize_checkpoint(model_path, out, recipe, progress=False, overwrite=True, calibration=calibration)
    return load_quantized(out, dtype=torch.bfloat16)


@torch.no_grad()
def score(models: dict[str, FalconForCausalLM], ids: torch.Tensor, context: int, stride: int) -> dict[str, dict]:
    """Per variant: summed NLL, summed KL against bf16, top-1 agreements, and the token count."""
    sums = {name: {"nll": 0.0, "kl": 0.0, "agree": 0, "tokens": 0} for name in models}
    spans = windows(ids.numel(), context, stride)
    for i, w in enumerate(spans):
        window = ids[w.begin : w.end][None]  # [1, L]
        targets = window[0, w.first_scored - w.begin :]  # tokens this window scores
        first = w.first_scored - w.begin - 1  # the position whose logits predict the first scored token
        logprobs = {
            name: F.log_softmax(model(window)[0, first:-1].float(), dim=-1) for name, model in models.items()
        }  # [S, V] each
        base = logprobs["bf16"]
        for name, lp in logprobs.items():
            s = sums[name]
            s["nll"] -= lp.gather(-1, targets[:, None]).sum().item()
            s["kl"] += (base.exp() * (base - lp)).sum().item()
            s["agree"] += (lp.argmax(-1) == base.argmax(-1)).sum().item()
            s["tokens"] += targets.numel()
        if sys.stderr.isatty():
            print(f"\r  window {i + 1}/{len(spans)}", end="", file=sys.stderr)
    return sums


def render(sums: dict[str, dict], sizes: dict[str, float], tokens: int, context: int, stride: int) -> str:
    base_ppl = math.exp(sums["bf16"]["nll"] / sums["bf16"]["tokens"])
    lines = [
        f"{tokens} tokens scored, windows of {context} every {stride}; KL and top-1 against bf16",
        "",
        "| weights | MiB | perplexity | vs bf16 | mean KL (nats) | top-1 same as bf16 | target |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, s in sums.items():
        ppl = math.exp(s["nll"] / s["tokens"])
        delta = (ppl / base_ppl - 1) * 100
        target = f"<= +{TARGETS[name]:.0f}%: {'met' if delta <= TARGETS[name] else 'MISSED'}" if name in TARGETS else ""
        lines.append(
            f"| {name} | {sizes[name]:.1f} | {ppl:.3f} | {delta:+.2f}% | {s['kl'] / s['tokens']:.5f} | "
            f"{100 * s['agree'] / s['tokens']:.2f}% | {target} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the embedded model)")
    parser.add_argument("--data", type=Path, default=DATA, help="held-out text (default: TinyStories valid)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    parser.add_argument("--context", type=int, default=None, help="window length (default: the model's maximum)")
    parser.add_argument("--stride", type=int, default=None, help="window step (default: context / 2)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model is None:
        from falconlm import default_model_path

        args.model = default_model_path()
    variants = ["bf16", *[v for v in args.variants if v != "bf16"]]
    work = Path(tempfile.mkdtemp(prefix="falconlm-quality-"))
    models = {v: load(args.model, v, work) for v in variants}
    shutil.rmtree(work)
    context = args.context or models["bf16"].config.max_position_embeddings
    stride = args.stride or context // 2
    ids = torch.from_numpy(tokenize_file(args.data, Tokenizer.from_pretrained(args.model), "eot").astype("int64"))
    ids = ids[: args.max_tokens]
    start = time.perf_counter()
    sums = score(models, ids, context, stride)
    print(f"\n  {time.perf_counter() - start:.0f}s", file=sys.stderr)
    sizes = {v: stored_bytes(m) / 2**20 for v, m in models.items()}
    print(f"model: {args.model}\ndata: {args.data}\n")
    print(render(sums, sizes, sums["bf16"]["tokens"], context, stride))


if __name__ == "__main__":
    main()
