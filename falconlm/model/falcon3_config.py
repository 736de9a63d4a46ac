"""Falcon3 configuration: the Llama layout's ``config.json`` (transformers' ``LlamaConfig`` field names) in, shapes out.

Falcon3 (TII, December 2024) is published as ``model_type: llama`` / ``LlamaForCausalLM``: RMSNorm, a SwiGLU MLP,
grouped-query attention with a wide head (256), rotary positions with theta 1000042, and a 131k vocabulary. The
derived names the engine reads (``num_kv_groups``, ``head_dim``, ``alibi``...) are the same as
:class:`~falconlm.model.config.FalconConfig`'s, so the paged KV cache, the dense cache and rotary code serve both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ROPE_TYPES, RopeScaling, _read_rope, write_config_json
from .config_base import (
    GroupedQueryShapes,
    check_positive_ints,
    hf_form,
    is_positive_int,
    read_config_json,
    split_known,
)

MODEL_TYPE = "llama"
ARCHITECTURE = "LlamaForCausalLM"


@dataclass
class Falcon3Config(GroupedQueryShapes):
    """Every field that changes the computation of a Llama-layout model. Defaults are Falcon3-7B-Base's."""

    vocab_size: int = 131072
    hidden_size: int = 3072
    intermediate_size: int = 23040
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None  # None means num_attention_heads (plain multi-head attention)
    head_dim: int | None = None  # None means hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000042.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    bos_token_id: int | None = 11
    eos_token_id: int | None = 11
    torch_dtype: str | None = None  # the dtype the checkpoint was saved in, informational
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # unknown keys, kept for saving

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and is_positive_int(self.num_attention_heads):
            self.head_dim = self.hidden_size // self.num_attention_heads
        self._validate()

    # ---- the names the engine reads beyond GroupedQueryShapes' -------------------------------------------
    @property
    def variant(self) -> str:
        """A human name for the block shape."""
        attention = "grouped-query" if self.num_key_value_heads < self.num_attention_heads else "multi-head"
        head = "tied" if self.tie_word_embeddings else "untied"
        return f"falcon3 / llama layout (RMSNorm, SwiGLU, {attention}, {head} head)"

    def matrix_shapes(self) -> dict[str, tuple[int, int]]:
        """[out, in] of each decoder layer's matrices, by their name inside the layer."""
        return {**self.attention_matrix_shapes(), **self.swiglu_matrix_shapes("mlp.")}

    def num_parameters(self) -> int:
        """Parameter count, a tied head counted once."""
        h = self.hidden_size
        matrices = sum(n * k for n, k in self.matrix_shapes().values())
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        biases = (q + 2 * kv + h) * self.attention_bias + (2 * self.intermediate_size + h) * self.mlp_bias
        per_layer = matrices + biases + 2 * h  # two RMSNorm weights
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_hidden_layers * per_layer + h + head

    # ---- validation -----------------------------------------------------------------------------------------
    def _validate(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        )
        check_positive_ints(self, positive)
        self._validate_attention()
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (the Llama layout uses 'silu')")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        scaling = self.rope_scaling
        if scaling is not None:
            if scaling.rope_type not in ROPE_TYPES:
                raise ValueError(f"rope_scaling type {scaling.rope_type!r} is not supported; use one of {ROPE_TYPES}")
            if scaling.rope_type != "default" and not scaling.factor >= 1.0:
                raise ValueError(f"rope_scaling factor must be >= 1, got {scaling.factor!r}")

    # ---- (de)serialisation ----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Falcon3Config:
        """Build from a config.json dict (``model_type: llama``)."""
        d = dict(raw)
        model_type = d.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"model_type {model_type!r} is not a Llama-layout model (expected {MODEL_TYPE!r})")
        if "dtype" in d:  # transformers >= 4.56 writes "dtype" instead of "torch_dtype"
            d.setdefault("torch_dtype", d.pop("dtype"))
        if d.get("pretraining_tp", 1) != 1:
            raise ValueError(f"pretraining_tp {d['pretraining_tp']!r} is not supported (only 1)")
        for name in ("bos_token_id", "eos_token_id"):  # Llama configs may list several; the first is the main one
            if isinstance(d.get(name), list):
                ids = d.pop(name)
                d[name] = ids[0] if ids else None
                d[f"{name}s"] = ids
        d["rope_scaling"] = _read_rope(d)
        if "rope_theta" in d and d["rope_theta"] is None:
            d.pop("rope_theta")
        if d.get("head_dim") is None:
            d.pop("head_dim", None)
        return cls(**split_known(cls, d))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Falcon3Config:
        """Read ``config.json`` from a checkpoint folder (or the file itself)."""
        return cls.from_dict(read_config_json(path))

    def to_dict(self) -> dict[str, Any]:
        """The HF form, loadable by transformers' LlamaConfig."""
        d = hf_form(self, ("architectures", "auto_map", "_name_or_path", "bos_token_ids", "eos_token_ids"))
        for name in ("bos_token_id", "eos_token_id"):
            if f"{name}s" in self.extra:
                d[name] = self.extra[f"{name}s"]
        d["model_type"] = MODEL_TYPE
        d["architectures"] = [ARCHITECTURE]
        d["rope_scaling"] = None if self.rope_scaling is None else self.rope_scaling.to_dict(legacy_type=False)
        return d

    def save_pretrained(self, path: str | Path) -> None:
        write_config_json(path, self.to_dict())
