"""Memory and decode-speed plan for Falcon-40B and Falcon-180B under tensor parallelism (computed, not measured).

From each model's config.json (``../shared/data/falcon-configs`` beside the checkout when present, else the
same architecture numbers written below) it computes, for ``--gpus`` ranks: weight bytes per layer, weights per GPU
in bf16 and int4, KV-cache bytes per token per GPU, how many KV tokens fit in the rest of a GPU, and a bandwidth
bound on decode tokens/s. Every figure is arithmetic on the architecture and the stated assumptions, none a
measurement.

Sharding assumed (Megatron style): QKV and the MLP up-projection split by output (whole heads and KV groups per
rank), the attention output and MLP down-projection split by input, the tied embedding/head split by vocabulary;
LayerNorms replicated. int4: block matrices int4 with groups of 128 and a bf16 scale and zero point per group
(0.53125 bytes a weight); the tied embedding/head int8 with a bf16 scale per row, as ``falconlm quantize`` keeps it.

Decode step time at batch B with every sequence C tokens long (each GPU streams its weights and its KV share once
per step, and the ranks sum partial outputs twice per layer, plus one vocabulary all-gather for the logits):

    t = weights_per_gpu / HBM + B * C * kv_per_token_per_gpu / HBM
        + (2 * layers + 1) * latency + ring bytes / NVLink,   decode tok/s = B / t

    python benchmarks/tp_plan.py [--gpus 8] [--context 1024] [--hbm-gb-s 3350] [--nvlink-gb-s 450]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The project's shared data beside the checkout (or under $FALCONLM_SHARED), as the tests find it.
CONFIG_DIR = Path(os.environ.get("FALCONLM_SHARED", REPO_ROOT.parent / "shared")) / "data" / "falcon-configs"
# model -> (config file in CONFIG_DIR, its architecture numbers for when the file is not there)
MODELS = {
    "falcon-40b": (
        "falcon-40b.config.transformers-4.35.2.json",
        {"hidden_size": 8192, "num_hidden_layers": 60, "num_attention_heads": 128, "num_kv_heads": 8},
    ),
    "falcon-180b": (
        "falcon-180B.config.json",
        {"hidden_size": 14848, "num_hidden_layers": 80, "num_attention_heads": 232, "num_kv_heads": 8},
    ),
}
COMMON = {"vocab_size": 65024, "new_decoder_architecture": True, "parallel_attn": True, "bias": False}
INT4_BYTES = 0.5 + 4 / 128  # a 4-bit weight, plus a bf16 scale and zero point per group of 128
BF16 = 2
GIB = 2**30


@dataclass(frozen=True)
class Shape:
    name: str
    source: str
    hidden: int
    layers: int
    heads: int
    kv_groups: int
    vocab: int
    ffn: int
    norms_per_layer: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_matrix_params(self) -> int:
        """QKV, attention output, MLP up and down of one block."""
        qkv = (self.heads + 2 * self.kv_groups) * self.head_dim * self.hidden
        return qkv + self.hidden * self.hidden + 2 * self.hidden * self.ffn

    @property
    def layer_norm_params(self) -> int:
        return self.norms_per_layer * 2 * self.hidden

    @property
    def params(self) -> int:
        per_layer = self.layer_matrix_params + self.layer_norm_params
        return self.layers * per_layer + self.vocab * self.hidden + 2 * self.hidden


def load_shape(name: str, config_dir: Path) -> Shape:
    """The architecture of ``name`` from its config.json in ``config_dir``, else from MODELS."""
    from falconlm.model.config import FalconConfig

    file, fallback = MODELS[name]
    path = config_dir / file
    if path.is_file():
        config, source = FalconConfig.from_pretrained(path), f"shared/data/falcon-configs/{path.name}"
    else:
        config, source = FalconConfig(**COMMON, **fallback), "architecture numbers in tp_plan.py (no config file)"
    norms = 1 if not config.new_decoder_architecture else (config.num_ln_in_parallel_attn or 2)
    return Shape(
        name=name,
        source=source,
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        heads=config.num_attention_heads,
        kv_groups=config.num_kv_groups,
        vocab=config.vocab_size,
        ffn=config.ffn_hidden_size or 4 * config.hidden_size,
        norms_per_layer=norms,
    )


@dataclass(frozen=True)
class Plan:
    """One model in one weight format on ``gpus`` ranks."""

    shape: Shape
    weights: str  # "bf16" or "int4"
    gpus: int

    def layer_bytes(self) -> float:
        """One block's weights, whole (all ranks together)."""
        per_weight = BF16 if self.weights == "bf16" else INT4_BYTES
        return self.shape.layer_matrix_params * per_weight + self.shape.layer_norm_params * BF16

    def gpu_bytes(self) -> float:
        """Weights held by one GPU: 1/gpus of every matrix, whole LayerNorms."""
        s, n = self.shape, self.gpus
        matrices = s.layer_matrix_params * (BF16 if self.weights == "bf16" else INT4_BYTES) / n
        norms = s.layer_norm_params * BF16
        embed_per_row = s.hidden * BF16 if self.weights == "bf16" else s.hidden + BF16  # int8 row + its scale
        return s.layers * (matrices + norms) + math.ceil(s.vocab / n) * embed_per_row + 2 * s.hidden * BF16

    def kv_bytes_per_token(self) -> int:
        """K and V of one token in every layer, for this GPU's KV groups (bf16 cache)."""
        s = self.shape
        return s.layers * 2 * math.ceil(s.kv_groups / self.gpus) * s.head_dim * BF16

    def kv_tokens_that_fit(self, gpu_gib: float, reserve: float) -> int:
        free = gpu_gib * GIB * (1 - reserve) - self.gpu_bytes()
        return max(0, int(free // self.kv_bytes_per_token()))

    def decode_tok_s(self, batch: int, context: int, hbm: float, nvlink: float, latency: float) -> float:
        """The bandwidth bound on decode tokens/s at ``batch`` sequences of ``context`` tokens each."""
        s, n = self.shape, self.gpus
        stream = (self.gpu_bytes() + batch * context * self.kv_bytes_per_token()) / hbm
        comm = 0.0
        if n > 1:
            ring = 2 * (n - 1) / n  # bytes a ring all-reduce moves per GPU, per byte reduced
            all_reduces = 2 * s.layers * (latency + ring * batch * s.hidden * BF16 / nvlink)
            logits = latency + (n - 1) / n * batch * s.vocab * BF16 / nvlink  # the vocabulary all-gather
            comm = all_reduces + logits
        return batch / (stream + comm)


def render(shapes: list[Shape], args: argparse.Namespace) -> str:
    hbm, nvlink, latency = args.hbm_gb_s * 1e9, args.nvlink_gb_s * 1e9, args.latency_us * 1e-6
    n = args.gpus
    lines = [
        f"COMPUTED, not measured: {n} GPUs of {args.gpu_gib:g} GiB, HBM {args.hbm_gb_s:g} GB/s, NVLink "
        f"{args.nvlink_gb_s:g} GB/s per direction and {args.latency_us:g} us per collective (assumed), "
        f"{args.reserve:.0%} of each GPU kept free, decode contexts of {args.context} tokens, bf16 KV cache.",
        "",
    ]
    for s in shapes:
        lines.append(
            f"- {s.name}: {s.params / 1e9:.1f}B parameters; hidden {s.hidden}, {s.layers} layers, {s.heads} query "
            f"heads of {s.head_dim}, {s.kv_groups} KV groups ({s.heads // s.kv_groups} queries each), ffn {s.ffn}, "
            f"vocab {s.vocab}; {math.ceil(s.kv_groups / n)} KV group(s) and {math.ceil(s.heads / n)} query heads "
            f"per GPU. Source: {s.source}"
        )
    lines += [
        "",
        "| model | weights | per layer MiB (all GPUs) | per layer per GPU MiB | weights per GPU GiB "
        "| KV per token per GPU KiB | KV tokens that fit per GPU | all-reduce per layer per token |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    plans = [Plan(s, w, n) for s in shapes for w in ("bf16", "int4")]
    for p in plans:
        ar = f"2 x {p.shape.hidden * BF16 / 1024:.0f} KiB"
        lines.append(
            f"| {p.shape.name} | {p.weights} | {p.layer_bytes() / 2**20:,.0f} | {p.layer_bytes() / n / 2**20:,.0f} "
            f"| {p.gpu_bytes() / GIB:.1f} | {p.kv_bytes_per_token() / 1024:.0f} "
            f"| {p.kv_tokens_that_fit(args.gpu_gib, args.reserve):,} | {ar} |"
        )
    batches = args.batches
    lines += [
        "",
        "| model | weights | " + " | ".join(f"decode b{b} tok/s" for b in batches) + " | comm share at b1 |",
        "|---|---|" + "---:|" * (len(batches) + 1),
    ]
    for p in plans:
        rates = [p.decode_tok_s(b, args.context, hbm, nvlink, latency) for b in batches]
        no_comm = 1 / (p.gpu_bytes() / hbm + args.context * p.kv_bytes_per_token() / hbm)
        share = 1 - rates[0] / no_comm if n > 1 else 0.0  # the collectives' part of a batch-1 step
        fits = p.kv_tokens_that_fit(args.gpu_gib, args.reserve)
        cells = [
            f"{r:,.0f}" if b * args.context <= fits else "(KV does not fit)"
            for b, r in zip(batches, rates, strict=True)
        ]
        lines.append(f"| {p.shape.name} | {p.weights} | " + " | ".join(cells) + f" | {share:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--config-dir", type=Path, default=CONFIG_DIR)
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory per GPU (H100 SXM: 80)")
    parser.add_argument("--reserve", type=float, default=0.10, help="fraction of each GPU left for activations")
    parser.add_argument("--hbm-gb-s", type=float, default=3350.0, help="HBM bandwidth (H100 SXM: 3.35 TB/s)")
    parser.add_argument("--nvlink-gb-s", type=float, default=450.0, help="NVLink bandwidth per direction")
    parser.add_argument("--latency-us", type=float, default=10.0, help="fixed cost of one small collective")
    parser.add_argument("--context", type=int, default=1024, help="tokens in each sequence's KV cache")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    args = parser.parse_args(argv)
    if args.gpus < 1 or not 0 <= args.reserve < 1 or args.context < 0:
        sys.exit("tp_plan: --gpus must be positive, --reserve in [0, 1) and --context not negative")
    print(render([load_shape(name, args.config_dir) for name in MODELS], args))


if __name__ == "__main__":
    main()
