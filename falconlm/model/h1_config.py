"""Falcon-H1 configuration: transformers' ``FalconH1Config`` field names in, derived shapes out.

Every H1 layer runs grouped-query attention and a Mamba-2 mixer side by side on the same normed input, then a
SwiGLU MLP. µP-style multipliers scale the embedding, the attention input / keys / output, the SSM input /
projections / output, the MLP gate and down projection, and the logits. Defaults and semantics are those of
transformers 4.57 (``configuration_falcon_h1.py``); the attributes the shared attention and rotary code reads
(``head_dim``, ``num_kv_groups``, ``rope_theta``, ``rope_scaling``, ``alibi``...) are spelled as on
:class:`~falconlm.model.config.FalconConfig`, so that code serves both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ROPE_TYPES, RopeScaling, _read_rope, write_config_json
from .config_base import GroupedQueryShapes, check_positive_ints, hf_form, read_config_json, split_known

MODEL_TYPE = "falcon_h1"
ARCHITECTURE = "FalconH1ForCausalLM"
SSM_MULTIPLIER_PARTS = ("z (gate)", "x", "B", "C", "dt")


@dataclass
class FalconH1Config(GroupedQueryShapes):
    """Every field that changes Falcon-H1's computation, with transformers' defaults."""

    vocab_size: int = 128000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    rope_theta: float = 100000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    projectors_bias: bool = False  # the Mamba out_proj's bias
    tie_word_embeddings: bool = False
    # the Mamba-2 mixer
    mamba_d_ssm: int | None = 1024  # the SSM's inner width (None: mamba_expand * hidden_size)
    mamba_n_heads: int = 128
    mamba_d_head: int | str = "auto"  # "auto": mamba_d_ssm // mamba_n_heads
    mamba_n_groups: int = 1
    mamba_d_state: int = 256
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_norm_before_gate: bool = True
    mamba_rms_norm: bool = False  # a gated RMSNorm on the scan output (else plain y * silu(z))
    # µP multipliers
    embedding_multiplier: float = 1.0
    lm_head_multiplier: float = 1.0
    attention_in_multiplier: float = 1.0
    attention_out_multiplier: float = 1.0
    key_multiplier: float = 1.0
    ssm_in_multiplier: float = 1.0
    ssm_out_multiplier: float = 1.0
    ssm_multipliers: list[float] = field(default_factory=lambda: [1.0] * 5)  # z, x, B, C, dt of in_proj
    mlp_multipliers: list[float] = field(default_factory=lambda: [1.0, 1.0])  # gate, down
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    torch_dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # unknown keys, kept for saving

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.mamba_d_ssm is None:
            self.mamba_d_ssm = self.mamba_expand * self.hidden_size
        if self.mamba_d_head == "auto" and self.mamba_n_heads > 0:
            self.mamba_d_head = self.mamba_d_ssm // self.mamba_n_heads
        for name in ("ssm_multipliers", "mlp_multipliers"):  # transformers' None means all ones
            if getattr(self, name) is None:
                setattr(self, name, [1.0] * (5 if name == "ssm_multipliers" else 2))
        self._validate()

    # ---- what the engine reads beyond GroupedQueryShapes' -----------------------------------------------
    hybrid = True  # the engine keeps KV blocks and a recurrent-state slot per sequence

    # ---- Mamba shapes ---------------------------------------------------------------------------------------
    @property
    def conv_dim(self) -> int:
        """Channels through the causal conv: x, B and C side by side."""
        return self.mamba_d_ssm + 2 * self.mamba_n_groups * self.mamba_d_state

    @property
    def in_proj_features(self) -> int:
        """in_proj's outputs: z (the gate), x, B, C and one dt per head."""
        return self.mamba_d_ssm + self.conv_dim + self.mamba_n_heads

    @property
    def family(self) -> str:
        return "falcon-h1"

    @property
    def variant(self) -> str:
        return (
            f"falcon-h1 (attention {self.num_attention_heads} heads / {self.num_key_value_heads} KV "
            f"+ Mamba-2 {self.mamba_n_heads} heads, every layer)"
        )

    def matrix_shapes(self) -> dict[str, tuple[int, int]]:
        """[out, in] of each decoder layer's matrices, by their name inside the layer (what quantization
        rewrites; the Mamba conv, A, D and Δ bias stay as they are)."""
        h = self.hidden_size
        return {
            **self.attention_matrix_shapes(),
            "mamba.in_proj": (self.in_proj_features, h),
            "mamba.out_proj": (h, self.mamba_d_ssm),
            **self.swiglu_matrix_shapes("feed_forward."),
        }

    def conv_state_shape(self) -> tuple[int, int]:
        """One layer's conv state per sequence: every conv channel's last ``mamba_d_conv - 1`` inputs."""
        return (self.conv_dim, self.mamba_d_conv - 1)

    def ssm_state_shape(self) -> tuple[int, int, int]:
        """One layer's SSM state per sequence: [heads, head dim, state size]."""
        return (self.mamba_n_heads, self.mamba_d_head, self.mamba_d_state)

    def conv_state_elements(self) -> int:
        """One sequence's conv state, all layers: the last ``mamba_d_conv - 1`` inputs of every conv channel."""
        return self.num_hidden_layers * self.conv_dim * (self.mamba_d_conv - 1)

    def ssm_state_elements(self) -> int:
        """One sequence's SSM state, all layers: [heads, head dim, state size] per layer."""
        return self.num_hidden_layers * self.mamba_n_heads * self.mamba_d_head * self.mamba_d_state

    def ssm_state_bytes_per_sequence(self, conv_bytes: int = 2, ssm_bytes: int = 4) -> int:
        """The fixed recurrent state one sequence holds, whatever its length (conv state in the activations'
        dtype, the SSM state in float32 by default)."""
        return self.conv_state_elements() * conv_bytes + self.ssm_state_elements() * ssm_bytes

    def num_parameters(self) -> int:
        """Parameter count, a tied head counted once."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv + h) * self.attention_bias
        mlp = 3 * h * self.intermediate_size + (2 * self.intermediate_size + h) * self.mlp_bias
        heads = self.mamba_n_heads
        mamba = (
            h * self.in_proj_features
            + self.in_proj_features * self.mamba_proj_bias
            + self.conv_dim * (self.mamba_d_conv + self.mamba_conv_bias)
            + 3 * heads  # dt_bias, A_log, D
            + self.mamba_d_ssm * self.mamba_rms_norm
            + self.mamba_d_ssm * h
            + h * self.projectors_bias
        )
        per_layer = attn + mlp + mamba + 2 * h
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
            "mamba_d_ssm",
            "mamba_n_heads",
            "mamba_d_head",
            "mamba_n_groups",
            "mamba_d_state",
            "mamba_d_conv",
            "mamba_chunk_size",
        )
        check_positive_ints(self, positive)
        self._validate_attention()
        if self.mamba_d_ssm % self.mamba_n_heads:
            raise ValueError(f"mamba_n_heads ({self.mamba_n_heads}) must divide mamba_d_ssm ({self.mamba_d_ssm})")
        if self.mamba_d_head * self.mamba_n_heads != self.mamba_d_ssm:
            raise ValueError(
                f"mamba_d_head ({self.mamba_d_head}) x mamba_n_heads ({self.mamba_n_heads}) must equal "
                f"mamba_d_ssm ({self.mamba_d_ssm})"
            )
        if self.mamba_n_heads % self.mamba_n_groups or self.mamba_d_ssm % self.mamba_n_groups:
            raise ValueError(
                f"mamba_n_groups ({self.mamba_n_groups}) must divide mamba_n_heads ({self.mamba_n_heads}) "
                f"and mamba_d_ssm ({self.mamba_d_ssm})"
            )
        if self.hidden_act not in ("silu", "swish"):
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (Falcon-H1 uses 'silu')")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        if self.rope_scaling is not None and self.rope_scaling.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope_scaling type {self.rope_scaling.rope_type!r} is not supported; use one of {ROPE_TYPES}"
            )
        for name, count in (("ssm_multipliers", 5), ("mlp_multipliers", 2)):
            value = getattr(self, name)
            ok = isinstance(value, (list, tuple)) and len(value) == count
            if not ok or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise ValueError(f"{name} must be a list of {count} numbers, got {value!r}")
            setattr(self, name, [float(v) for v in value])

    # ---- (de)serialisation ----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FalconH1Config:
        """Build from a config.json dict (``model_type: falcon_h1``)."""
        d = dict(raw)
        model_type = d.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"model_type {model_type!r} is not a Falcon-H1 model (expected {MODEL_TYPE!r})")
        if "dtype" in d:  # transformers >= 4.56 writes "dtype" instead of "torch_dtype"
            d.setdefault("torch_dtype", d.pop("dtype"))
        d["rope_scaling"] = _read_rope(d)
        for name in ("rope_theta", "head_dim", "ssm_multipliers", "mlp_multipliers"):
            if name in d and d[name] is None:
                d.pop(name)
        multipliers = (
            "key_multiplier",
            "attention_in_multiplier",
            "attention_out_multiplier",
            "ssm_in_multiplier",
            "ssm_out_multiplier",
        )
        for name in multipliers:  # transformers reads None as 1.0
            if name in d and d[name] is None:
                d[name] = 1.0
        return cls(**split_known(cls, d))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> FalconH1Config:
        """Read ``config.json`` from a checkpoint folder (or the file itself)."""
        return cls.from_dict(read_config_json(path))

    def to_dict(self) -> dict[str, Any]:
        """The HF form, loadable by transformers' FalconH1Config."""
        d = hf_form(self, ("architectures", "auto_map", "_name_or_path"))
        d["model_type"] = MODEL_TYPE
        d["architectures"] = [ARCHITECTURE]
        d["rope_scaling"] = None if self.rope_scaling is None else self.rope_scaling.to_dict()
        return d

    def save_pretrained(self, path: str | Path) -> None:
        write_config_json(path, self.to_dict())
