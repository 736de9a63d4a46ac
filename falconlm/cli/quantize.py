"""``falconlm quantize``: write an int8 or int4 copy of a checkpoint folder, tensor by tensor."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import check_model_path, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="write a weight-only int8 or int4 (group-wise) copy of a checkpoint",
        description=(
            "Quantize a checkpoint's matrices to int8 (one scale per output channel) or int4 (a scale and zero "
            "point per group of input columns) and write a folder that every falconlm front end loads. The "
            "embedding / lm_head matrix is int8 unless --head-bits says otherwise."
        ),
    )
    p.add_argument("--model", "-m", type=Path, required=True, help="checkpoint folder to quantize")
    p.add_argument("--out", "-o", type=Path, required=True, help="folder to write the quantized checkpoint into")
    p.add_argument("--bits", type=int, required=True, choices=(4, 8), help="4 (group-wise) or 8 (per channel)")
    p.add_argument("--group-size", type=positive_int, default=None, help="int4 group size: 32, 64 or 128 (default 64)")
    p.add_argument("--sym", action="store_true", help="int4: symmetric groups, no zero point (default asymmetric)")
    p.add_argument(
        "--head-bits",
        type=int,
        default=8,
        choices=(4, 8, 16),
        help="bits of the embedding / lm_head matrix; 16 keeps the checkpoint's dtype (default 8)",
    )
    p.add_argument(
        "--method",
        default="rtn",
        choices=("rtn", "gptq"),
        help="rtn: round to nearest (default); gptq: int4 rounding that compensates errors on --calibration text",
    )
    p.add_argument("--calibration", type=Path, default=None, help="GPTQ: a text file to calibrate on")
    p.add_argument("--calibration-samples", type=positive_int, default=32, help="GPTQ: windows drawn (32)")
    p.add_argument("--calibration-length", type=positive_int, default=256, help="GPTQ: tokens per window (256)")
    p.add_argument("--overwrite", action="store_true", help="replace the weights in a non-empty --out folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it shows on a terminal only)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_model_path(args.model)
    int4 = args.bits == 4 or args.head_bits == 4
    if not int4 and args.group_size is not None:
        raise ValueError("--group-size applies to int4 only (int8 has one scale per output channel)")
    if not int4 and args.sym:
        raise ValueError("--sym applies to int4 only (int8 is always symmetric)")
    if args.method == "gptq" and args.calibration is None:
        raise ValueError("--method gptq needs --calibration FILE (text to calibrate on)")
    if args.method != "gptq" and args.calibration is not None:
        raise ValueError("--calibration applies to --method gptq only")
    from ..quant import QuantRecipe, quantize_checkpoint

    recipe = QuantRecipe(
        bits=args.bits,
        group_size=64 if args.group_size is None else args.group_size,
        symmetric=args.sym,
        head_bits=args.head_bits,
        method=args.method,
    )
    calibration = None if args.calibration is None else _calibration(args)
    report = quantize_checkpoint(
        args.model,
        args.out,
        recipe,
        progress=False if args.no_progress else None,
        overwrite=args.overwrite,
        calibration=calibration,
    )
    for note in report.notes:
        print(f"note: {note}")
    ratio = report.source_bytes / max(report.output_bytes, 1)
    print(
        f"wrote {report.out} ({recipe.name}): "
        f"{report.output_bytes / 2**20:.1f} MiB from {report.source_bytes / 2**20:.1f} MiB "
        f"({ratio:.1f}x smaller) in {report.seconds:.1f}s"
    )
    return 0


def _calibration(args: argparse.Namespace):
    """Token ids [samples, length] drawn from the --calibration text with the model's own tokenizer."""
    import torch

    from ..quant.gptq import calibration_ids
    from ..tokenizer import Tokenizer

    if not args.calibration.is_file():
        raise FileNotFoundError(f"calibration file {args.calibration} does not exist")
    tokenizer = Tokenizer.from_pretrained(args.model)
    tokens = torch.tensor(tokenizer.encode(args.calibration.read_text(encoding="utf-8")), dtype=torch.long)
    return calibration_ids(tokens, args.calibration_samples, args.calibration_length)
