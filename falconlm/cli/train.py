"""``falconlm train-tokenizer``, ``falconlm train`` and ``falconlm eval-ppl``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .options import add_quantize_option, check_model_path

DTYPES = ("float32", "bfloat16", "float16")


def register(sub: argparse._SubParsersAction) -> None:
    _register_tokenizer(sub)
    _register_train(sub)
    _register_ppl(sub)


# ---- train-tokenizer ---------------------------------------------------------------------------
def _register_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-tokenizer",
        help="train a Falcon-style byte-level BPE tokenizer on text files",
        description="Train a byte-level BPE tokenizer with Falcon's special tokens (ids 0..11, "
        "<|endoftext|> = 11). Writes tokenizer.json and tokenizer_config.json into --out.",
    )
    p.add_argument("--input", "-i", nargs="+", type=Path, required=True, metavar="FILE", help="UTF-8 text files")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    p.add_argument("--out", "-o", type=Path, required=True, help="output folder")
    p.add_argument("--min-frequency", type=int, default=2, help="least count of a pair to merge (default 2)")
    p.add_argument("--model-max-length", type=int, default=2048, help="for tokenizer_config.json (default 2048)")
    _add_doc_split(p)
    p.set_defaults(run=run_train_tokenizer)


def run_train_tokenizer(args: argparse.Namespace) -> int:
    from ..train.tokenizer_trainer import train_tokenizer

    out = train_tokenizer(
        args.input,
        args.vocab_size,
        args.out,
        min_frequency=args.min_frequency,
        model_max_length=args.model_max_length,
        doc_split=args.doc_split,
    )
    print(f"wrote {out / 'tokenizer.json'} and {out / 'tokenizer_config.json'}")
    return 0


# ---- train -------------------------------------------------------------------------------------
def _register_train(sub: argparse._SubParsersAction) -> None:
    from ..train.args import TrainArgs

    d = TrainArgs(out=Path("."))
    p = sub.add_parser(
        "train",
        help="pretrain or fine-tune a Falcon model on text files",
        description="Train a Falcon model (single process, or data-parallel under torchrun: DDP, or FSDP with --fsdp). "
        "Writes a Hugging Face checkpoint, training_state.pt, metrics.jsonl and loss.png to --out.",
    )
    p.add_argument("--config", default=None, help="a preset name (e.g. tinystories-5m) or a config.json")
    p.add_argument("--data", nargs="+", type=Path, default=[], metavar="FILE", help="training text files")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (tokenizer.json)")
    p.add_argument("--out", "-o", type=Path, required=True, help="output folder (checkpoint, logs)")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-data", nargs="+", type=Path, default=[], metavar="FILE", help="validation files")
    val.add_argument(
        "--val-fraction",
        type=float,
        default=d.val_fraction,
        help=f"hold out the last fraction of each data file (default {d.val_fraction})",
    )
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help=f"sequences per micro-batch per process (default {d.batch_size})",
    )
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per sequence (default {d.seq_len})")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step (default 1)")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    p.add_argument("--min-lr", type=float, default=None, help="final learning rate (default lr / 10)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default min(100, steps / 10))")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"default {d.weight_decay}")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="gradient norm clip, 0 = off (default 1)")
    p.add_argument("--dropout", type=float, default=None, help="hidden and attention dropout (default: config's)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (weights stay float32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed for init, data and dropout (default {d.seed})")
    p.add_argument(
        "--eval-every",
        type=int,
        default=d.eval_every,
        help=f"validate every N steps, 0 = at the end only (default {d.eval_every})",
    )
    p.add_argument("--eval-batches", type=int, default=d.eval_batches, help=f"default {d.eval_batches}")
    p.add_argument(
        "--save-every",
        type=int,
        default=d.save_every,
        help=f"checkpoint every N steps, 0 = at the end only (default {d.save_every})",
    )
    p.add_argument(
        "--log-every",
        type=int,
        default=d.log_every,
        help=f"metrics.jsonl every N steps (default {d.log_every})",
    )
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="STEP",
        help="stop with a checkpoint after this step (the schedule still spans --steps)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run saved in --out (its settings are reused: --out alone is enough)",
    )
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        metavar="PATH",
        help="start from this checkpoint's weights and config",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard weights, gradients and optimizer state over the processes (FSDP2) instead "
        "of replicating them (DDP); checkpoints stay full",
    )
    _add_doc_split(p)
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from ..train.args import TrainArgs
    from ..train.trainer import train

    for path in [*args.data, *args.val_data]:
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {path}")
    targs = TrainArgs(
        out=args.out,
        data=args.data,
        tokenizer=args.tokenizer,
        config=args.config,
        val_data=args.val_data,
        val_fraction=args.val_fraction,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        grad_accum=args.grad_accum,
        lr=args.lr,
        min_lr=args.min_lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        dropout=args.dropout,
        bf16=args.bf16,
        compile=args.compile,
        seed=args.seed,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        save_every=args.save_every,
        log_every=args.log_every,
        stop_after=args.stop_after,
        resume=args.resume,
        init_from=args.init_from,
        threads=args.threads,
        device=args.device,
        fsdp=args.fsdp,
        doc_split=args.doc_split,
    )
    result = train(targs)
    if result.interrupted:
        return 130
    val = f", val loss {result.val_loss:.4f} (ppl {result.val_ppl:.2f})" if result.val_loss is not None else ""
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    print(f"step {result.step}: train loss {loss}{val}; {result.tokens_per_s:,.0f} tokens/s; saved to {result.out}")
    return 0


# ---- eval-ppl ----------------------------------------------------------------------------------
def _register_ppl(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval-ppl",
        help="sliding-window perplexity of a model on a text file",
        description="Perplexity with windows of --context tokens every --stride tokens, scoring "
        "only each window's new tokens.",
    )
    p.add_argument("--model", "-m", type=Path, default=None, help="checkpoint folder (default: the embedded model)")
    p.add_argument("--data", type=Path, required=True, metavar="FILE", help="a UTF-8 text file")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    p.add_argument("--context", type=int, default=None, help="window length (default: the model's maximum)")
    p.add_argument("--stride", type=int, default=None, help="window step (default: context / 2)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="default float32")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    add_quantize_option(p)
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_doc_split(p)
    p.set_defaults(run=run_eval_ppl)


def run_eval_ppl(args: argparse.Namespace) -> int:
    import torch

    from ..model.falcon import FalconForCausalLM
    from ..tokenizer import Tokenizer
    from ..train.data import tokenize_file
    from ..train.perplexity import perplexity

    check_model_path(args.model)
    if not args.data.is_file():
        raise FileNotFoundError(f"data file not found: {args.data}")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise ValueError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    if args.model is None:
        from ..default_model import default_model_path

        args.model = default_model_path()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = Tokenizer.from_pretrained(args.model)
    ids = tokenize_file(args.data, tokenizer, args.doc_split)[: args.max_tokens]
    model = FalconForCausalLM.from_pretrained(
        args.model, dtype=getattr(torch, args.dtype), device=device, quantize=args.quantize
    )
    result = perplexity(model, torch.from_numpy(ids.astype("int64")), args.context, args.stride, args.batch_size)
    if args.json:
        print(json.dumps({"tokens": result.tokens, "nll": result.nll, "perplexity": result.ppl}))
    else:
        print(f"tokens scored: {result.tokens}")
        print(f"mean NLL:      {result.nll:.4f}")
        print(f"perplexity:    {result.ppl:.3f}")
    return 0


def _add_doc_split(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--doc-split",
        default="eot",
        choices=("eot", "blank", "none"),
        help="documents end at <|endoftext|> (eot, default), at blank lines, or with the file",
    )
