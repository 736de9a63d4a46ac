"""Device and dtype resolution for every front end: names to torch objects, 'auto' to the fastest here."""

from __future__ import annotations

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype:
    """'bfloat16' / 'bf16' / torch.bfloat16 and friends -> torch dtype, 'auto' -> :func:`auto_dtype` on
    ``device``; ValueError for anything else."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif dtype == "auto":
        return auto_dtype(resolve_device(device))[0]
    elif dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r} is not supported; use one of auto, float32, bfloat16, float16")


def auto_dtype(device: torch.device) -> tuple[torch.dtype, str]:
    """The fastest weights dtype on ``device`` and why: bfloat16 on GPUs, and on CPUs where the native kernels
    run (they widen bfloat16 to float32 where the CPU has no bfloat16 arithmetic, so bfloat16 reads half the
    bytes and computes as fast) or the CPU multiplies bfloat16 itself; float32 elsewhere, where torch's bfloat16
    GEMMs are several times slower than its float32 ones."""
    from .. import native
    from ..native.ops import bf16_hardware

    if device.type == "cuda":
        return torch.bfloat16, "a CUDA device"
    if native.kernels() is not None:
        return torch.bfloat16, f"the native {native.chosen_variant()} kernels run here"
    if bf16_hardware():
        return torch.bfloat16, "the CPU has bfloat16 arithmetic"
    return torch.float32, f"no native kernels ({native.unavailable_reason()}) and no bfloat16 arithmetic"


PROMPT_STEP_TOKENS = 512  # a server's tokens per step on GPUs and on CPUs with bfloat16 arithmetic
SLOW_PROMPT_STEP_TOKENS = 128  # ... on CPUs without it, where prompts run several times slower


def auto_step_tokens(device: torch.device) -> tuple[int, str]:
    """A server's default tokens per step on ``device`` and why. Where prompt processing is slow (a CPU without
    bfloat16 arithmetic: AVX2-only x86, most ARM), a 512-token prompt step takes about a second on a small model
    and every prompt in it waits for its end; steps of 128 tokens let the first prompts of a burst answer sooner
    (bench-194m on an AVX2 stand-in, 16 streams of 200-token prompts: TTFT p50 1.6 to 0.87 s at the same
    output rate in int8, 1.7 to 1.2 s and 6% fewer tokens/s in bf16)."""
    from ..native.ops import bf16_hardware

    if device.type != "cpu":
        return PROMPT_STEP_TOKENS, f"a {device.type} device"
    if bf16_hardware():
        return PROMPT_STEP_TOKENS, "the CPU has bfloat16 arithmetic"
    return SLOW_PROMPT_STEP_TOKENS, "no bfloat16 arithmetic on this CPU: shorter prompt steps, earlier first tokens"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None means CUDA when present, else CPU; ValueError (one line) for a device this machine does not have."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {str(device)!r} is not a device name torch knows; use cpu or cuda") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {str(device)!r} is not available: {why}; use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} is not available: {torch.cuda.device_count()} CUDA GPU(s) here")
    return resolved
