"""Falcon configuration: Hugging Face ``config.json`` (native and legacy RefinedWeb forms) in, derived shapes out.

Field names follow transformers' ``FalconConfig`` so a checkpoint's config loads by lookup. The one rule that
every other part of the code relies on is :attr:`FalconConfig.num_kv_groups` (falcon-spec §8 step 1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config_base import check_positive_ints, hf_form, read_config_json, split_known

NATIVE_MODEL_TYPE = "falcon"
# Legacy TII remote-code model types: "RefinedWeb" is the 40B-style (new decoder) layout.
LEGACY_MODEL_TYPES = {"RefinedWeb": True, "RefinedWebModel": False}
# Legacy key -> native key (falcon-spec §5.3).
LEGACY_ALIASES = {
    "n_head": "num_attention_heads",
    "n_layer": "num_hidden_layers",
    "n_head_kv": "num_kv_heads",
    "n_embed": "hidden_size",
}
ROPE_TYPES = ("default", "linear", "dynamic")


@dataclass
class RopeScaling:
    """RoPE position scaling: ``linear`` divides positions by ``factor``; ``dynamic`` is NTK-aware base scaling."""

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None

    def to_dict(self, legacy_type: bool = True) -> dict[str, Any]:
        """The config.json form: ``rope_type`` (and transformers 4.x's older ``type`` when ``legacy_type``)."""
        d: dict[str, Any] = {"rope_type": self.rope_type}
        if legacy_type:
            d["type"] = self.rope_type
        d["factor"] = self.factor
        if self.original_max_position_embeddings:
            d["original_max_position_embeddings"] = self.original_max_position_embeddings
        return d


def write_config_json(path: str | Path, config: dict[str, Any]) -> None:
    """``config`` as ``path``/config.json (the folder is created), keys sorted."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@dataclass
class FalconConfig:
    """Every field that changes Falcon's computation. Defaults are HF's (the falcon-7b shape)."""

    vocab_size: int = 65024
    hidden_size: int = 4544
    num_hidden_layers: int = 32
    num_attention_heads: int = 71
    num_kv_heads: int | None = None  # None means num_attention_heads; ignored for old-arch multi-query
    multi_query: bool = True  # old arch only: one K and one V head
    new_decoder_architecture: bool = False  # 40B-style grouped-query layout, always parallel
    parallel_attn: bool = True
    num_ln_in_parallel_attn: int | None = None  # new arch: 2 -> ln_attn + ln_mlp, 1 -> one shared LayerNorm
    bias: bool = False
    alibi: bool = False
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    layer_norm_epsilon: float = 1e-5
    ffn_hidden_size: int | None = None  # None means 4 * hidden_size
    activation: str = "gelu"
    tie_word_embeddings: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    bos_token_id: int | None = 11
    eos_token_id: int | None = 11
    torch_dtype: str | None = None  # the dtype the checkpoint was saved in, informational
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # unknown keys, kept for saving

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.new_decoder_architecture and self.num_ln_in_parallel_attn is None:
            self.num_ln_in_parallel_attn = 2
        self._validate()

    # ---- derived shapes -------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_kv_groups(self) -> int:
        """KV heads actually stored: 1 for old-arch multi-query whatever num_kv_heads says (falcon-spec §8.1)."""
        if self.new_decoder_architecture:
            return self.num_kv_heads
        return 1 if self.multi_query else self.num_attention_heads

    @property
    def queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_kv_groups

    @property
    def qkv_out_features(self) -> int:
        return (self.num_attention_heads + 2 * self.num_kv_groups) * self.head_dim

    @property
    def rotary(self) -> bool:
        return not self.alibi

    @property
    def layer_norms(self) -> tuple[str, ...]:
        """Names of a block's LayerNorms, in the order the block uses them (falcon-spec §3.1-3.2)."""
        if not self.parallel_attn:
            return ("input_layernorm", "post_attention_layernorm")
        if self.new_decoder_architecture and self.num_ln_in_parallel_attn == 2:
            return ("ln_attn", "ln_mlp")
        return ("input_layernorm",)

    @property
    def variant(self) -> str:
        """A human name for the block shape."""
        if not self.parallel_attn:
            return "falcon-rw (sequential, " + ("ALiBi" if self.alibi else "RoPE") + ")"
        if not self.new_decoder_architecture:
            return "falcon-7b style (multi-query, parallel)" if self.multi_query else "parallel multi-head"
        if self.num_ln_in_parallel_attn == 2:
            return "falcon-40b/180b style (grouped-query, two LayerNorms)"
        return "falcon2-11b style (grouped-query, one LayerNorm)"

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """K and V for every layer, KV groups only (never broadcast to all query heads)."""
        return 2 * self.num_kv_groups * self.head_dim * self.num_hidden_layers * bytes_per_element

    # ---- validation -----------------------------------------------------------------------------------------
    def _validate(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_kv_heads",
            "ffn_hidden_size",
            "max_position_embeddings",
        )
        check_positive_ints(self, positive)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.new_decoder_architecture:
            if self.num_attention_heads % self.num_kv_heads:
                raise ValueError(
                    f"num_kv_heads ({self.num_kv_heads}) must divide num_attention_heads ({self.num_attention_heads})"
                )
            if not self.parallel_attn:
                raise ValueError("parallel_attn must be true when new_decoder_architecture is true")
        if self.num_ln_in_parallel_attn not in (None, 1, 2):
            raise ValueError(f"num_ln_in_parallel_attn must be 1 or 2, got {self.num_ln_in_parallel_attn!r}")
        if self.activation != "gelu":
            raise ValueError(f"activation {self.activation!r} is not supported (Falcon uses 'gelu')")
        if self.rotary and self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ValueError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        if self.layer_norm_epsilon <= 0:
            raise ValueError(f"layer_norm_epsilon must be positive, got {self.layer_norm_epsilon!r}")
        scaling = self.rope_scaling
        if scaling is not None:
            if self.alibi:
                raise ValueError("rope_scaling cannot be used with alibi")
            if scaling.rope_type not in ROPE_TYPES:
                raise ValueError(
                    f"rope_scaling type {scaling.rope_type!r} is not supported; falconlm computes "
                    f"{', '.join(ROPE_TYPES)} (as transformers' Falcon does)"
                )
            if scaling.rope_type != "default" and not scaling.factor >= 1.0:
                raise ValueError(f"rope_scaling factor must be >= 1, got {scaling.factor!r}")

    # ---- (de)serialisation ----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FalconConfig:
        """Build from a config.json dict, native (``model_type: falcon``) or legacy RefinedWeb."""
        d = dict(raw)
        model_type = d.pop("model_type", NATIVE_MODEL_TYPE)
        legacy = model_type in LEGACY_MODEL_TYPES
        if not legacy and model_type != NATIVE_MODEL_TYPE:
            raise ValueError(
                f"model_type {model_type!r} is not a Falcon model (expected 'falcon', "
                "'RefinedWeb' or 'RefinedWebModel')"
            )
        for old, new in LEGACY_ALIASES.items():
            if old in d:
                value = d.pop(old)
                if new in d and d[new] != value:
                    raise ValueError(f"{old} ({value!r}) contradicts {new} ({d[new]!r})")
                d[new] = value
        if legacy:
            # TII's RWConfig defaults differ from FalconConfig's (falcon-spec §5.3).
            d.setdefault("new_decoder_architecture", LEGACY_MODEL_TYPES[model_type])
            d.setdefault("multi_query", False)
            d.setdefault("parallel_attn", False)
            d.setdefault("bos_token_id", 1)
            d.setdefault("eos_token_id", 2)
        if "dtype" in d:  # transformers >= 4.56 writes "dtype" instead of "torch_dtype"
            dtype = d.pop("dtype")
            d.setdefault("torch_dtype", dtype)
        d["rope_scaling"] = _read_rope(d)
        if "rope_theta" in d and d["rope_theta"] is None:
            d.pop("rope_theta")
        return cls(**split_known(cls, d))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> FalconConfig:
        """Read ``config.json`` from a checkpoint folder (or the file itself)."""
        return cls.from_dict(read_config_json(path))

    def to_dict(self) -> dict[str, Any]:
        """The native HF form, loadable by transformers' FalconConfig."""
        d = hf_form(self, ("architectures", "auto_map", "_name_or_path"))
        d["model_type"] = NATIVE_MODEL_TYPE
        d["architectures"] = ["FalconForCausalLM"]
        d["rope_scaling"] = None if self.rope_scaling is None else self.rope_scaling.to_dict()
        return d

    def save_pretrained(self, path: str | Path) -> None:
        write_config_json(path, self.to_dict())

    # ---- sizes ----------------------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        """Parameter count, a tied head counted once."""
        h, f, layers = self.hidden_size, self.ffn_hidden_size, self.num_hidden_layers
        b = 1 if self.bias else 0
        per_block = (
            self.qkv_out_features * h
            + b * self.qkv_out_features
            + h * h
            + b * h
            + f * h
            + b * f
            + h * f
            + b * h
            + 2 * h * len(self.layer_norms)
        )
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + layers * per_block + 2 * h + head


def _read_rope(d: dict[str, Any]) -> RopeScaling | None:
    """Accept transformers 4.x ``rope_scaling`` ({type|rope_type, factor}) or 5.x ``rope_parameters``."""
    scaling = d.pop("rope_scaling", None)
    params = d.pop("rope_parameters", None)
    if params is not None:
        if not isinstance(params, dict):
            raise ValueError(f"rope_parameters must be an object, got {params!r}")
        if "rope_theta" in params:
            if "rope_theta" in d and d["rope_theta"] is not None and d["rope_theta"] != params["rope_theta"]:
                raise ValueError(
                    f"rope_parameters.rope_theta ({params['rope_theta']}) contradicts rope_theta ({d['rope_theta']})"
                )
            d["rope_theta"] = params["rope_theta"]
        if params.get("rope_type", params.get("type", "default")) != "default":
            if scaling is not None:
                raise ValueError("rope_scaling and rope_parameters are both set; give one")
            scaling = params
    if scaling is None:
        return None
    if isinstance(scaling, RopeScaling):
        return scaling
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be an object, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    if "factor" not in scaling:  # transformers requires it for linear and dynamic scaling
        raise ValueError(f"rope_scaling factor is required for rope type {rope_type!r}")
    factor = scaling["factor"]
    if not isinstance(factor, (int, float)) or isinstance(factor, bool):
        raise ValueError(f"rope_scaling factor must be a number, got {factor!r}")
    return RopeScaling(
        rope_type=rope_type,
        factor=float(factor),
        original_max_position_embeddings=scaling.get("original_max_position_embeddings"),
    )


PRESETS: dict[str, dict[str, Any]] = {
    "falcon-rw-1b": {
        "vocab_size": 50304,
        "hidden_size": 2048,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "multi_query": False,
        "parallel_attn": False,
        "bias": True,
        "alibi": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "falcon-7b": {},
    "falcon-40b": {
        "hidden_size": 8192,
        "num_hidden_layers": 60,
        "num_attention_heads": 128,
        "num_kv_heads": 8,
        "new_decoder_architecture": True,
    },
    "falcon-180b": {
        "hidden_size": 14848,
        "num_hidden_layers": 80,
        "num_attention_heads": 232,
        "num_kv_heads": 8,
        "new_decoder_architecture": True,
    },
    "falcon2-11b": {
        "hidden_size": 4096,
        "num_hidden_layers": 60,
        "num_attention_heads": 32,
        "num_kv_heads": 8,
        "new_decoder_architecture": True,
        "num_ln_in_parallel_attn": 1,
        "ffn_hidden_size": 16384,
        "tie_word_embeddings": False,
        "rope_theta": 500042.0,
        "max_position_embeddings": 8192,
    },
    # The embedded default model: Falcon-7B layout (multi-query, parallel, one LayerNorm), about 5M parameters.
    "tinystories-5m": {
        "vocab_size": 4096,
        "hidden_size": 256,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "ffn_hidden_size": 1024,
        "max_position_embeddings": 512,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
    # The benchmark shape: Falcon-7B layout scaled down to about 194M parameters.
    "bench-194m": {"hidden_size": 1024, "num_hidden_layers": 12, "num_attention_heads": 16},
}


def preset(name: str, **overrides: Any) -> FalconConfig:
    """A named shape (see PRESETS), with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return FalconConfig(**{**PRESETS[name], **overrides})
