"""Tensor-parallel logits parity: N ranks of ``load_sharded`` against the whole model in one process.

Run under ``torchrun --nproc-per-node N`` (gloo on CPU, NCCL with ``--device cuda``). Every rank loads its shard of
each checkpoint and runs the same greedy prefill + decode through a dense KV cache; rank 0 also runs the unsharded
model and compares the logits of every step. Without ``--model`` it writes small random checkpoints of the layouts
that split differently: Falcon-7B style (multi-query, 14 heads: uneven on 4 or 8 ranks) and Falcon-40B style (new
decoder architecture, 8 KV groups). Prints one line per checkpoint; exits 1 when a difference passes ``--tol``.

    torchrun --nproc-per-node 2 benchmarks/tp_parity.py [--device cuda] [--dtype float32] [--model PATH ...]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

SHAPES = {  # small random checkpoints of each layout: name -> FalconConfig fields
    "7b-style-mqa": {"hidden_size": 896, "num_attention_heads": 14, "num_hidden_layers": 2},
    "40b-style-gqa": {
        "hidden_size": 1024,
        "num_attention_heads": 16,
        "num_kv_heads": 8,
        "num_hidden_layers": 2,
        "new_decoder_architecture": True,
        "parallel_attn": True,
        "bias": False,
    },
}
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.15}  # max |logit difference| (random weights, logits of order 1)


def make_checkpoints(folder: Path) -> list[Path]:
    """Write (once) the random checkpoints of SHAPES into ``folder``."""
    from falconlm.model.config import FalconConfig
    from falconlm.model.falcon import FalconForCausalLM

    paths = []
    for name, fields in SHAPES.items():
        path = folder / name
        if not (path / "config.json").is_file():
            model = FalconForCausalLM(FalconConfig(vocab_size=1024, max_position_embeddings=256, **fields))
            model.init_weights(seed=0)
            model.save_pretrained(path)
        paths.append(path)
    return paths


def greedy_logits(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """The last-position logits of the prompt and of ``steps`` greedy decode steps, stacked [steps + 1, B, vocab]."""
    cache = model.new_kv_cache(ids.shape[0], ids.shape[1] + steps)
    logits = model(ids, kv_cache=cache, last_token_only=True)[:, -1]
    out = [logits.float()]
    for _ in range(steps):
        logits = model(logits.argmax(-1, keepdim=True), kv_cache=cache, last_token_only=True)[:, -1]
        out.append(logits.float())
    return torch.stack(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, nargs="*", default=None, help="checkpoints (default: random ones)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/tp-parity"), help="where random ones go")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=sorted(TOLERANCE), default="float32")
    parser.add_argument("--steps", type=int, default=8, help="greedy decode steps after the prompt")
    parser.add_argument("--tol", type=float, default=None, help="max |logit difference| (default by dtype)")
    args = parser.parse_args()

    from falconlm.model.falcon import FalconForCausalLM
    from falconlm.parallel import init_parallel, load_sharded

    torch.set_grad_enabled(False)
    state = init_parallel(int(os.environ.get("WORLD_SIZE", "1")), args.device)
    dtype, tol = getattr(torch, args.dtype), args.tol if args.tol is not None else TOLERANCE[args.dtype]
    if state.is_driver and not args.model:
        make_checkpoints(args.out)
    if state.distributed:
        dist.barrier()
    paths = args.model or [args.out / name for name in SHAPES]
    failed = False
    for path in paths:
        sharded = load_sharded(path, state, dtype)
        ids = torch.randint(0, sharded.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
        ours = greedy_logits(sharded, ids.to(state.device), args.steps)
        del sharded
        if state.is_driver:
            whole = FalconForCausalLM.from_pretrained(path, dtype=dtype, device=state.device).eval()
            reference = greedy_logits(whole, ids.to(state.device), args.steps)
            diff = (ours - reference).abs().max().item()
            same = torch.equal(ours.argmax(-1), reference.argmax(-1))
            ok = diff <= tol and same
            failed |= not ok
            print(
                f"{'ok  ' if ok else 'FAIL'} {path.name}: {state.world_size} ranks on {state.device.type}, "
                f"{args.dtype}: max |logit diff| {diff:.2e} (tol {tol:g}), "
                f"greedy tokens {'equal' if same else 'DIFFER'}",
                flush=True,
            )
        if state.distributed:
            dist.barrier()
    if state.distributed:
        dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    from falconlm.parallel.state import exit_rank

    exit_rank(main())  # no interpreter finalization (see exit_rank)
