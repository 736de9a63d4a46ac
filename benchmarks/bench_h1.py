"""Falcon-H1 benchmark: falconlm against transformers on the same random H1-style checkpoint, same run.

The ``200m`` shape is Falcon-H1-0.5B's layer (hidden 1024, attention 8 heads / 2 KV of 64, Mamba-2 24 heads of
64 with state 128, MLP 2048, vocab 32784, untied head) over 11 layers: about 206M parameters. ``tiny`` is a
seconds-long smoke shape. Both carry the 0.5B's µP multipliers, so every multiply is paid as in the real model.

Measured, each for falconlm and transformers (torch CPU), in float32 and in bfloat16 (``--dtypes``): prefill of a
512-token prompt (batch 1), greedy decode at batch 1 and batch 8 after a short prompt, and batch-1 decode after a
long context (attention's per-token cost grows with the context; the Mamba-2 half's does not). Also printed: KV-cache
bytes per token and recurrent-state bytes per sequence. falconlm runs through its serving engine when the engine runs
H1 (continuous batching, paged KV cache, state pool), else through the model's own cached step.

    python benchmarks/bench_h1.py [--size 200m|tiny] [--threads 2] [--dtypes float32 bfloat16] [--repeats 3]
                                  [--new-tokens 32] [--long-context 1024] [--out bench-out]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SIZES = {
    "200m": {"hidden_size": 1024, "num_hidden_layers": 11, "intermediate_size": 2048, "vocab_size": 32784},
    "tiny": {"hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 256, "vocab_size": 512},
}
SHAPE_0_5B = {  # Falcon-H1-0.5B's heads, state and multipliers (tests/fixtures/configs/falcon-h1-0.5b-base.json)
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "mamba_n_heads": 24,
    "mamba_d_head": 64,
    "mamba_d_ssm": 1536,
    "mamba_d_state": 128,
    "mamba_d_conv": 4,
    "mamba_chunk_size": 128,
    "mamba_n_groups": 1,
    "rope_theta": 1e11,
    "tie_word_embeddings": False,
    "embedding_multiplier": 5.656854249492381,
    "lm_head_multiplier": 0.0390625,
    "attention_out_multiplier": 0.9375,
    "key_multiplier": 0.39062499999999994,
    "ssm_in_multiplier": 1.25,
    "ssm_out_multiplier": 0.23570226039551587,
    "ssm_multipliers": [0.3535533905932738, 0.25, 0.3535533905932738, 0.5, 0.3535533905932738],
    "mlp_multipliers": [0.8838834764831844, 0.5859375],
}
TINY_HEADS = {"num_attention_heads": 4, "head_dim": 32, "mamba_n_heads": 8, "mamba_d_head": 32, "mamba_d_ssm": 256}


def hf_config(size: str):
    import transformers

    shape = {**SHAPE_0_5B, **SIZES[size], **(TINY_HEADS if size == "tiny" else {})}
    return transformers.FalconH1Config(**shape, max_position_embeddings=8192)


def make_checkpoint(out: Path, size: str) -> Path:
    """The random checkpoint, written once (by transformers, so both sides load the same folder)."""
    import transformers

    folder = out / f"bench-h1-{size}"
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    model = transformers.FalconH1ForCausalLM(hf_config(size))
    model.save_pretrained(folder)
    return folder


def timed(fn, repeats: int = 1) -> float:
    """The fastest of ``repeats`` calls of ``fn``, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


# ---- the two implementations: generate(ids, new_tokens) -> when each new token (of every row) was there ----------
def falconlm_runner(folder: Path, dtype: torch.dtype, max_len: int):
    from falconlm.model.falcon_h1 import FalconH1ForCausalLM

    model = FalconH1ForCausalLM.from_pretrained(folder, dtype=dtype)
    engine = _engine(model, max_len)
    if engine is not None:
        from falconlm.engine.sampling_params import SamplingParams

        def generate(ids: torch.Tensor, new_tokens: int) -> list[float]:
            params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
            for i, prompt in enumerate(ids.tolist()):
                engine.add_request(f"bench-{i}", prompt, params)
            times = []
            while engine.has_unfinished():
                if engine.step():  # every row adds its token in the same step (same-length prompts)
                    times.append(time.perf_counter())
            return times

        return model, "engine", generate

    def generate(ids: torch.Tensor, new_tokens: int) -> list[float]:  # the model's own cached step
        cache = model.new_cache(ids.shape[0], ids.shape[1] + new_tokens)
        logits = model(ids, cache=cache, last_token_only=True)
        times = [time.perf_counter()]
        for _ in range(new_tokens - 1):
            logits = model(logits[:, -1].argmax(-1, keepdim=True), cache=cache)
            times.append(time.perf_counter())
        return times

    return model, "model step API", generate


def _engine(model, max_len: int):
    """The serving engine over ``model``, or None when this build's engine does not run H1."""
    try:
        from falconlm.engine.engine import Engine, EngineConfig
        from falconlm.engine.sampling_params import SamplingParams

        class _NoText:  # token ids only: the benchmark measures the engine, not detokenization
            eos_token_id = None

            def decode(self, ids, skip_special_tokens=False):
                return ""

        config = EngineConfig(max_num_seqs=8, max_num_batched_tokens=max_len, enable_prefix_caching=False)
        engine = Engine(model, _NoText(), config)
        engine.generate([[0, 1, 2]], [SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)])
        return engine
    except Exception:  # an engine that cannot take H1 yet: the model path measures instead
        return None


def transformers_runner(folder: Path, dtype: torch.dtype):
    import transformers
    from transformers.generation.streamers import BaseStreamer

    model = transformers.FalconH1ForCausalLM.from_pretrained(folder, dtype=dtype).eval()

    class Clock(BaseStreamer):  # generate hands it the prompt, then each step's new tokens
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: torch.Tensor) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def generate(ids: torch.Tensor, new_tokens: int) -> list[float]:
        clock = Clock()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock)
        return clock.times[1:]  # the first put is the prompt

    return generate


def measure(generate, vocab: int, prefill: int, new_tokens: int, long_context: int, repeats: int) -> dict:
    """Tokens per second. A decode rate is the time from each row's first new token to its last, over
    ``new_tokens`` more tokens (the best of ``repeats`` calls), so the prompt's cost is never in it."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, prefill), generator=gen)
    short = torch.randint(0, vocab, (8, 16), generator=gen)
    long = torch.randint(0, vocab, (1, long_context), generator=gen)
    generate(short[:1, :8], 2)  # warm up

    def decode_rate(ids: torch.Tensor) -> float:
        best = float("inf")
        for _ in range(repeats):
            times = generate(ids, new_tokens + 1)
            if len(times) != new_tokens + 1:
                raise RuntimeError(f"expected {new_tokens + 1} token times, got {len(times)}")
            best = min(best, times[-1] - times[0])
        return ids.shape[0] * new_tokens / best

    return {
        "prefill_tok_s": prefill / timed(lambda: generate(prompt, 1), repeats),
        "decode_b1_tok_s": decode_rate(short[:1]),
        "decode_b8_tok_s": decode_rate(short),
        f"decode_b1_after_{long_context}_tok_s": decode_rate(long),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="200m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=["float32", "bfloat16"])
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--long-context", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per figure")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    folder = make_checkpoint(args.out, args.size)
    reports = [run_dtype(folder, dtype_name, args) for dtype_name in args.dtypes]
    print(json.dumps(reports, indent=2))
    print("\n\n".join(render(report) for report in reports))


def run_dtype(folder: Path, dtype_name: str, args: argparse.Namespace) -> dict:
    """falconlm's and transformers' figures in one dtype."""
    dtype = getattr(torch, dtype_name)
    max_len = max(args.prefill, args.long_context) + args.new_tokens + 8
    model, path, ours = falconlm_runner(folder, dtype, max_len)
    config = model.config
    itemsize = torch.tensor([], dtype=dtype).element_size()
    report = {
        "shape": f"bench-h1-{args.size}",
        "parameters": model.num_parameters(),
        "dtype": dtype_name,
        "threads": args.threads,
        "falconlm_path": path,
        "kv_cache_bytes_per_token": config.kv_cache_bytes_per_token(itemsize),
        "recurrent_state_bytes_per_sequence": config.ssm_state_bytes_per_sequence(conv_bytes=itemsize),
        "results": {},
    }
    vocab = config.vocab_size
    shape = (args.prefill, args.new_tokens, args.long_context, args.repeats)
    report["results"]["falconlm"] = measure(ours, vocab, *shape)
    del model, ours
    theirs = transformers_runner(folder, dtype)
    report["results"]["transformers"] = measure(theirs, vocab, *shape)
    return report


def render(report: dict) -> str:
    """A markdown table of the results, falconlm / transformers ratio last."""
    ours, theirs = report["results"]["falconlm"], report["results"]["transformers"]
    lines = [
        f"{report['shape']}: {report['parameters'] / 1e6:.0f}M parameters, {report['dtype']}, "
        f"{report['threads']} threads, falconlm via {report['falconlm_path']}; KV cache "
        f"{report['kv_cache_bytes_per_token']} B/token, recurrent state "
        f"{report['recurrent_state_bytes_per_sequence'] / 2**20:.2f} MiB/sequence",
        "",
        "| tok/s | " + " | ".join(ours) + " |",
        "|---|" + "---|" * len(ours),
        "| falconlm | " + " | ".join(f"{v:.1f}" for v in ours.values()) + " |",
        "| transformers | " + " | ".join(f"{v:.1f}" for v in theirs.values()) + " |",
        "| ratio | " + " | ".join(f"{ours[k] / theirs[k]:.2f}x" for k in ours) + " |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
