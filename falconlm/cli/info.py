"""``falconlm info``: what a checkpoint is, read from its config (weights are not loaded), and whether this
machine runs the native CPU kernels."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..model.mamba_config import FalconMambaConfig
from .options import check_model_path, positive_int

if TYPE_CHECKING:
    from ..model.families import Family

BYTES_PER_ELEMENT = {"float32": 4, "bfloat16": 2, "float16": 2}
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="describe a checkpoint: variant, sizes, KV-cache bytes per token",
        description="Describe a Falcon checkpoint from its config.json (weights are not loaded).",
    )
    p.add_argument("--model", "-m", type=Path, default=None, help="checkpoint folder (default: the embedded model)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=sorted(BYTES_PER_ELEMENT),
        help="dtype for the KV-cache figure (default: the checkpoint's, else bfloat16)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--tensor-parallel-size",
        type=positive_int,
        default=1,
        metavar="N",
        help="also show how N tensor-parallel ranks would run it",
    )
    p.set_defaults(run=run)


def describe(path: Path, dtype: str | None = None) -> dict:
    from ..model.families import family_of, load_config  # imports torch: only when the command runs

    config = load_config(path)
    family = family_of(config)
    if getattr(config, "recurrent", False):
        return describe_mamba(path, config, family.title, _fused_decode_status(family, config), dtype)
    dtype = dtype or (config.torch_dtype if config.torch_dtype in BYTES_PER_ELEMENT else "bfloat16")
    weights = [f for f in path.iterdir() if f.suffix in WEIGHT_SUFFIXES] if path.is_dir() else []
    return {
        "path": str(path),
        "family": family.title,
        "variant": config.variant,
        "parameters": config.num_parameters(),
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "attention_heads": config.num_attention_heads,
        "kv_groups": config.num_kv_groups,
        "head_dim": config.head_dim,
        "ffn_hidden_size": config.ffn_hidden_size,
        "vocab_size": config.vocab_size,
        "positions": "ALiBi" if config.alibi else f"RoPE theta={config.rope_theta:.10g}",
        "tied_head": config.tie_word_embeddings,
        "context_length": config.max_position_embeddings,
        "dtype": dtype,
        "kv_cache_bytes_per_token": config.kv_cache_bytes_per_token(BYTES_PER_ELEMENT[dtype]),
        **_recurrent_state_facts(config, BYTES_PER_ELEMENT[dtype]),
        "fused_decode_step": _fused_decode_status(family, config),
        "size_on_disk_bytes": sum(f.stat().st_size for f in weights),
        "native_kernels": _native_status(),
    }


def describe_mamba(path: Path, config: FalconMambaConfig, family: str, fused: str, dtype: str | None = None) -> dict:
    """A Mamba-1 checkpoint: no attention, so no KV cache; a fixed recurrent state per sequence instead."""
    dtype = dtype or (config.torch_dtype if config.torch_dtype in BYTES_PER_ELEMENT else "bfloat16")
    weights = [f for f in path.iterdir() if f.suffix in WEIGHT_SUFFIXES] if path.is_dir() else []
    return {
        "path": str(path),
        "family": family,
        "variant": "Falcon-Mamba (Mamba-1, B/C/dt RMS norms)" if config.mixer_rms else "Mamba-1",
        "parameters": config.num_parameters(),
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "ssm_state_size": config.state_size,
        "conv_kernel": config.conv_kernel,
        "time_step_rank": config.time_step_rank,
        "vocab_size": config.vocab_size,
        "positions": "none (recurrent)",
        "tied_head": config.tie_word_embeddings,
        "context_length": config.max_position_embeddings,
        "dtype": dtype,
        "kv_cache_bytes_per_token": 0,
        "ssm_state_bytes_per_sequence": config.state_bytes_per_sequence(BYTES_PER_ELEMENT[dtype], 4),
        "prefix_caching": "off (recurrent state cannot be shared by blocks)",
        "size_on_disk_bytes": sum(f.stat().st_size for f in weights),
        "native_kernels": _native_status(),
        "fused_decode_step": fused,
    }


def run(args: argparse.Namespace) -> int:
    check_model_path(args.model)
    if args.model is None:
        from ..default_model import default_model_path

        args.model = default_model_path()
    facts = describe(args.model, args.dtype)
    if args.tensor_parallel_size > 1:
        facts.update(tensor_parallel_facts(facts, args.tensor_parallel_size))
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    facts["parameters"] = f"{facts['parameters']:,} ({_human(facts['parameters'], 1000, '')})"
    facts["kv_cache_bytes_per_token"] = f"{_human(facts['kv_cache_bytes_per_token'], 1024, 'B')} ({facts['dtype']})"
    if "ssm_state_bytes_per_sequence" in facts:
        state = facts["ssm_state_bytes_per_sequence"]
        facts["ssm_state_bytes_per_sequence"] = f"{_human(state, 1024, 'B')} (conv {facts['dtype']}, SSM float32)"
    facts["size_on_disk_bytes"] = (
        _human(facts["size_on_disk_bytes"], 1024, "B") if facts["size_on_disk_bytes"] else "no weight files"
    )
    kernels = facts["native_kernels"]
    facts["native_kernels"] = kernels.pop("chosen") + "; " + "; ".join(f"{k}: {v}" for k, v in kernels.items())
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        print(f"{key.replace('_bytes', '').replace('_', ' '):<{width}}  {value}")
    return 0


def tensor_parallel_facts(facts: dict, size: int) -> dict:
    """How ``size`` ranks run the checkpoint: the launch, each rank's query heads, and the fused step off."""
    from ..engine.tp_runner import FUSED_OFF_REASON
    from ..parallel import partition

    plan = f"{size} ranks (torchrun --nproc-per-node {size} ... --tensor-parallel-size {size})"
    if "attention_heads" in facts:
        heads = [partition(facts["attention_heads"], size, r).size for r in range(size)]
        plan += f"; query heads per rank: {', '.join(map(str, heads))}"
    return {"tensor_parallel": plan, "fused_decode_step": f"no ({FUSED_OFF_REASON})"}


def _human(n: float, base: int, unit: str) -> str:
    prefixes = ["", "K", "M", "G", "T"] if base == 1024 else ["", "K", "M", "B", "T"]
    for prefix in prefixes:
        if n < base or prefix == prefixes[-1]:
            suffix = f"{prefix}i{unit}" if base == 1024 and prefix else f"{prefix}{unit}"
            return f"{n:.4g} {suffix}".rstrip()
        n /= base
    return str(n)


def _recurrent_state_facts(config, itemsize: int) -> dict:
    """For families with Mamba layers: the fixed state each sequence holds (conv state in ``itemsize`` bytes,
    the SSM state in float32), whatever its length."""
    if not hasattr(config, "ssm_state_bytes_per_sequence"):
        return {}
    return {
        "mamba_heads": config.mamba_n_heads,
        "ssm_state_size": config.mamba_d_state,
        "ssm_state_bytes_per_sequence": config.ssm_state_bytes_per_sequence(conv_bytes=itemsize),
        "prefix_caching": "off (recurrent state cannot be shared by blocks)",
    }


def _fused_decode_status(family: Family, config: object) -> str:
    """Whether decode steps of this checkpoint can take the fused native step (its weights decide the rest)."""
    if family.fused_decode is not None:
        return f"no ({family.fused_decode})"
    from ..engine.fused_decode import config_unsupported  # imports torch: only when the command runs

    why = config_unsupported(config)
    return f"no ({why})" if why else "yes, on the CPU with native kernels and bfloat16 / int8 / int4 layer weights"


def _native_status() -> dict[str, str]:
    from .. import native  # imports torch: only when the command runs
    from ..engine.kernels import bf16_prompt_path, quantized_prompt_path

    status = native.status()
    if native.unavailable_reason() is None:
        status["prompts"] = f"{quantized_prompt_path()}; {bf16_prompt_path()}"
    return status
