"""Falcon-Mamba configuration: the ``config.json`` of ``FalconMambaForCausalLM`` (and plain ``MambaForCausalLM``).

Field names are transformers' ``FalconMambaConfig``'s. ``model_type`` decides the one difference between the two:
``falcon_mamba`` RMS-normalises B, C and Δ inside each mixer (``mixer_rms_eps``), ``mamba`` does not. Both keep
a fixed-size recurrent state per sequence instead of a KV cache (:meth:`FalconMambaConfig.state_bytes_per_sequence`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import write_config_json
from .config_base import hf_form, read_config_json, split_known

MAMBA_MODEL_TYPES = {"falcon_mamba": "FalconMambaForCausalLM", "mamba": "MambaForCausalLM"}
DEFAULT_CONTEXT = 8192  # Mamba has no position limit; the engine's default context (Falcon-Mamba's training length)


@dataclass
class FalconMambaConfig:
    """Every field that changes the computation. Defaults are transformers' (a 130M-style Mamba)."""

    model_type: str = "falcon_mamba"
    vocab_size: int = 50280
    hidden_size: int = 768
    state_size: int = 16
    num_hidden_layers: int = 32
    layer_norm_epsilon: float = 1e-5
    expand: int = 2
    intermediate_size: int | None = None  # None means expand * hidden_size
    conv_kernel: int = 4
    use_bias: bool = False  # in_proj and out_proj
    use_conv_bias: bool = True
    hidden_act: str = "silu"
    residual_in_fp32: bool = True
    time_step_rank: int | str = "auto"  # "auto" means ceil(hidden_size / 16)
    mixer_rms_eps: float = 1e-6
    tie_word_embeddings: bool = True
    initializer_range: float = 0.1
    max_position_embeddings: int = DEFAULT_CONTEXT
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    pad_token_id: int | None = 0
    torch_dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = int(self.expand * self.hidden_size)
        if self.time_step_rank == "auto":
            self.time_step_rank = math.ceil(self.hidden_size / 16)
        if self.model_type not in MAMBA_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not a Mamba-1 model ({sorted(MAMBA_MODEL_TYPES)})")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (Mamba uses 'silu')")
        for name in ("vocab_size", "hidden_size", "state_size", "num_hidden_layers", "conv_kernel", "time_step_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive whole number, got {value!r}")

    # ---- what the engine needs to know ----------------------------------------------------------------------
    @property
    def family(self) -> str:
        return "falcon-mamba" if self.mixer_rms else "mamba"

    @property
    def mixer_rms(self) -> bool:
        """Whether B, C and Δ are RMS-normalised in the mixer (Falcon-Mamba's addition to Mamba-1)."""
        return self.model_type == "falcon_mamba"

    @property
    def rope_scaling(self) -> None:
        """No positions, so nothing to stretch (read by the engine's context checks)."""
        return None

    @property
    def recurrent(self) -> bool:
        return True

    def conv_state_shape(self) -> tuple[int, int]:
        """One layer's convolution state for one sequence: the last ``conv_kernel - 1`` inputs, [K-1, D]."""
        return self.conv_kernel - 1, self.intermediate_size

    def ssm_state_shape(self) -> tuple[int, int]:
        """One layer's SSM state for one sequence, [N, D]: channels last (see ``selective_scan.py``)."""
        return self.state_size, self.intermediate_size

    def state_bytes_per_sequence(self, conv_bytes: int = 2, ssm_bytes: int = 4) -> int:
        """Bytes of recurrent state one sequence holds, all layers: conv state in the model dtype, SSM state in
        float32 by default (as the engine keeps it), whatever the context length."""
        k, d = self.conv_state_shape()
        n = self.state_size
        return self.num_hidden_layers * d * (k * conv_bytes + n * ssm_bytes)

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """No attention layers: no KV cache."""
        return 0

    def matrix_shapes(self) -> dict[str, tuple[int, int]]:
        """[out, in] of each quantizable layer matrix (``mixer.in_proj``...), for the family registry.

        ``dt_proj`` is left out: its input is only rank R = hidden/16 wide, it holds a few percent of the weights,
        and Δ's exponential amplifies its rounding."""
        h, d, n, r = self.hidden_size, self.intermediate_size, self.state_size, self.time_step_rank
        return {"mixer.in_proj": (2 * d, h), "mixer.x_proj": (r + 2 * n, d), "mixer.out_proj": (h, d)}

    def num_parameters(self) -> int:
        """Parameter count, a tied head counted once."""
        h, d, n, r, k = (
            self.hidden_size,
            self.intermediate_size,
            self.state_size,
            self.time_step_rank,
            self.conv_kernel,
        )
        b = 1 if self.use_bias else 0
        mixer = (
            h * 2 * d
            + b * 2 * d  # in_proj
            + d * k
            + (d if self.use_conv_bias else 0)  # conv1d
            + d * (r + 2 * n)  # x_proj
            + r * d
            + d  # dt_proj
            + d * n
            + d  # A_log, D
            + d * h
            + b * h  # out_proj
        )
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_hidden_layers * (mixer + h) + h + head

    # ---- (de)serialisation ----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FalconMambaConfig:
        d = dict(raw)
        if "model_type" not in d:  # only architectures said which
            archs = d.get("architectures") or []
            d["model_type"] = next((t for t, a in MAMBA_MODEL_TYPES.items() if a in archs), "falcon_mamba")
        if "dtype" in d:  # transformers >= 4.56 writes "dtype"
            d.setdefault("torch_dtype", d.pop("dtype"))
        return cls(**split_known(cls, d))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> FalconMambaConfig:
        return cls.from_dict(read_config_json(path))

    def to_dict(self) -> dict[str, Any]:
        d = hf_form(self, ("architectures", "_name_or_path"))
        d["architectures"] = [MAMBA_MODEL_TYPES[self.model_type]]
        return d

    def save_pretrained(self, path: str | Path) -> None:
        write_config_json(path, self.to_dict())


def is_mamba_config(raw: dict[str, Any]) -> bool:
    """Whether a config.json dict is a Mamba-1 model (by ``model_type``, else by ``architectures``)."""
    if raw.get("model_type") in MAMBA_MODEL_TYPES:
        return True
    archs = raw.get("architectures") or []
    return "model_type" not in raw and any(a in MAMBA_MODEL_TYPES.values() for a in archs)
