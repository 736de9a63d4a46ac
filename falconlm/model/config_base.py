"""What the family configs share: reading config.json, keeping unknown keys, checking sizes, GQA shapes.

Each family's config (``config.py``, ``falcon3_config.py``, ``mamba_config.py``, ``h1_config.py``) is a dataclass
with the fields of its transformers counterpart and an ``extra`` dict of the keys it does not model, which are
written back on save.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The JSON object of ``config.json`` in a checkpoint folder (or the file itself)."""
    p = Path(path)
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(f"no config.json in {p}")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file} is not valid JSON: {exc}") from exc
    except RecursionError:
        raise ValueError(f"{file} is not a usable config: its JSON is nested too deeply") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file} must hold a JSON object")
    return raw


def split_known(config_class: type, d: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments for ``config_class`` from a config.json dict: its fields by name, every other key
    kept in ``extra``."""
    known = {f.name for f in fields(config_class)} - {"extra"}
    kwargs = {k: v for k, v in d.items() if k in known}
    kwargs["extra"] = {k: v for k, v in d.items() if k not in known}
    return kwargs


def hf_form(config: Any, dropped: tuple[str, ...]) -> dict[str, Any]:
    """The config's fields with its unknown keys merged back in (minus ``dropped``, which the caller rewrites)."""
    d = asdict(config)
    d.pop("extra")
    return {**{k: v for k, v in config.extra.items() if k not in dropped}, **d}


def is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_positive_ints(config: Any, names: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the first of ``names`` that is not a positive integer."""
    for name in names:
        value = getattr(config, name)
        if not is_positive_int(value):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class GroupedQueryShapes:
    """The derived names the engine's KV cache and rotary code read, for a config with transformers' Llama-style
    attention fields (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``intermediate_size``):
    Falcon3 and Falcon-H1. They are spelled as on :class:`~falconlm.model.config.FalconConfig`."""

    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    rope_theta: float

    alibi = False
    rotary = True

    @property
    def num_kv_groups(self) -> int:
        """KV heads stored in the cache (never broadcast to the query heads)."""
        return self.num_key_value_heads

    @property
    def queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def ffn_hidden_size(self) -> int:
        return self.intermediate_size

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """K and V for every layer, KV heads only."""
        return 2 * self.num_key_value_heads * self.head_dim * self.num_hidden_layers * bytes_per_element

    def attention_matrix_shapes(self, prefix: str = "self_attn.") -> dict[str, tuple[int, int]]:
        """[out, in] of one layer's q, k, v and o projections."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        return {
            f"{prefix}q_proj": (q, h),
            f"{prefix}k_proj": (kv, h),
            f"{prefix}v_proj": (kv, h),
            f"{prefix}o_proj": (h, q),
        }

    def swiglu_matrix_shapes(self, prefix: str) -> dict[str, tuple[int, int]]:
        """[out, in] of one layer's gate, up and down projections."""
        h, f = self.hidden_size, self.intermediate_size
        return {f"{prefix}gate_proj": (f, h), f"{prefix}up_proj": (f, h), f"{prefix}down_proj": (h, f)}

    def _validate_attention(self) -> None:
        """The head checks every rotary grouped-query config needs (after the positive-size checks)."""
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ValueError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
