"""The prepared GPU check: run it once on a machine with an NVIDIA GPU (CI never needs one).

1. The Triton int4 group-wise kernel (``falconlm.quant.kernels.triton``) against the dequantize-then-matmul
   reference on the layer shapes of bench-1b, at 1 and 16 rows: largest relative error and time per call.
2. Greedy decode of bench-1b on CUDA (random weights, Falcon-7B style, hidden 2048, 24 layers, multi-query,
   about 1.15B parameters): falconlm's engine in bfloat16 and int4 g64 against transformers in bfloat16, the same
   run, batch 1 and batch 8, 128 new tokens after a 16-token prompt.

    python benchmarks/bench_gpu.py [--out bench-out] [--new-tokens 128]

It exits with one line (code 2) where no CUDA device or no triton is found.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import checkpoint_folder, make_checkpoint, quantized_folder

PROMPT = 16
SIZE = "1b"


def cuda_time(fn, repeats: int = 20) -> float:
    """Median seconds of ``fn()`` on the GPU (synchronised)."""
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def triton_rows(shapes: list[tuple[int, int]]) -> list[str]:
    import torch

    from falconlm.quant.kernels import WeightSpec, select_kernel
    from falconlm.quant.primitives import plan_groups, quantize_int4

    lines = ["| layer [N, K] | rows | max rel error | triton us | reference us |", "|---|---:|---:|---:|---:|"]
    for n, k in shapes:
        qt = quantize_int4(torch.randn(n, k) * 0.02, plan_groups(k, 64)).to(device="cuda")
        spec = WeightSpec.of(qt)
        fast, ref = select_kernel(spec, "cuda", "triton"), select_kernel(spec, "cuda", "reference")
        fast_w = tuple(fast.prepare(qt, torch.bfloat16).values())
        ref_w = tuple(ref.prepare(qt, torch.bfloat16).values())
        for rows in (1, 16):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            y, expected = fast.matmul(x, fast_w, spec).float(), ref.matmul(x, ref_w, spec).float()
            err = float((y - expected).abs().max() / expected.abs().max())
            t_fast = cuda_time(lambda x=x, f=fast, w=fast_w, s=spec: f.matmul(x, w, s))
            t_ref = cuda_time(lambda x=x, r=ref, w=ref_w, s=spec: r.matmul(x, w, s))
            lines.append(f"| [{n}, {k}] | {rows} | {err:.1e} | {t_fast * 1e6:.0f} | {t_ref * 1e6:.0f} |")
    return lines


def falconlm_tok_s(folder: Path, batch: int, new_tokens: int) -> float:
    import torch

    from falconlm import LLM, SamplingParams

    llm = LLM(folder, dtype="bfloat16", device="cuda", max_num_seqs=batch)
    prompts = torch.randint(0, llm.config.vocab_size, (batch, PROMPT)).tolist()
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate(prompts, params)
    torch.cuda.synchronize()
    return batch * new_tokens / (time.perf_counter() - start)


def transformers_tok_s(folder: Path, batch: int, new_tokens: int) -> float:
    import torch
    from transformers import FalconForCausalLM as HFModel

    model = HFModel.from_pretrained(folder, torch_dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, PROMPT), device="cuda")
    kwargs = {"do_sample": False, "min_new_tokens": new_tokens, "max_new_tokens": new_tokens, "pad_token_id": 0}
    with torch.no_grad():
        model.generate(ids, **{**kwargs, "min_new_tokens": 4, "max_new_tokens": 4})
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, **kwargs)
        torch.cuda.synchronize()
    return batch * new_tokens / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; run it on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("bench_gpu: triton is not installed (pip install '.[triton]')", file=sys.stderr)
        return 2
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    folder = make_checkpoint(checkpoint_folder(args.out, SIZE), SIZE)
    int4 = quantized_folder(args.out, "int4-g64", SIZE)
    print("\n".join(triton_rows([(2048 + 2 * 64, 2048), (2048, 2048), (8192, 2048), (2048, 8192)])))
    print("\n| engine, weights | batch 1 tok/s | batch 8 tok/s |\n|---|---:|---:|")
    for name, fn in (
        ("transformers bf16", lambda b: transformers_tok_s(folder, b, args.new_tokens)),
        ("falconlm bf16", lambda b: falconlm_tok_s(folder, b, args.new_tokens)),
        ("falconlm int4 g64 (triton)", lambda b: falconlm_tok_s(int4, b, args.new_tokens)),
    ):
        print(f"| {name} | {fn(1):.1f} | {fn(8):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
