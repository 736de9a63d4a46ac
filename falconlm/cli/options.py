"""Options shared by several subcommands."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..engine.sampling_params import SamplingParams


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "-m",
        type=Path,
        default=None,
        help="checkpoint folder in Hugging Face layout (default: the embedded model)",
    )
    add_dtype_option(p)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    add_quantize_option(p)
    add_deterministic_option(p)


def add_dtype_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and activations dtype (default auto: the fastest here, bfloat16 where the native kernels or "
        "bfloat16 hardware run, else float32)",
    )


def add_deterministic_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="batch-invariant kernels on every path: a request's tokens never depend on what else runs with it "
        "(slower prompt processing)",
    )


def add_quantize_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quantize", default=None, metavar="SCHEME", help="quantize on load: int8, or int4[-g32|-g64|-g128][-sym]"
    )


def add_sampling_options(p: argparse.ArgumentParser, max_tokens: int = 200) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate (default {max_tokens})")
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--top-k", type=int, default=40, help="keep the k most likely tokens, 0 = off (default 40)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="TEXT",
        help="stop when this text is produced (repeatable; not printed)",
    )


def sampling_params(args: argparse.Namespace, extra_stop: list[str] | None = None) -> SamplingParams:
    from ..engine.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=[*(args.stop or []), *(extra_stop or [])],
    )


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def check_model_path(path: Path | None) -> None:
    """Fail early, in one line, on a --model that cannot be a checkpoint folder."""
    if path is None:
        return
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"model path {path} is not a folder")


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1 to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1 to 65535, got {text!r}")
    return value


_BYTE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BYTE_UNITS |= {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def byte_size(text: str) -> int:
    """argparse type: a positive number of bytes, plain or with a unit (512MB, 200MiB, 10GiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]i?)?b?\s*", text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected bytes like 200MiB or 1000000, got {text!r}")
    amount = int(float(match.group(1)) * _BYTE_UNITS[match.group(2) or ""])
    if amount < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return amount
