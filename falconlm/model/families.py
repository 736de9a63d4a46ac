"""Which Falcon family a checkpoint is, from its ``config.json``, and the classes and layout that run it.

Hugging Face names a checkpoint's code twice: ``model_type`` (the config class) and ``architectures`` (the model
class). :func:`detect` reads ``model_type`` first and ``architectures`` when it is missing, and a config without
either is the original Falcon (TII's first configs had neither). Everything that builds a model from a folder
(the checkpoint loader, quantized loading, ``falconlm info``, the engine factory) asks :func:`family_of` /
:func:`load_config` here, so a new family is one entry in :data:`FAMILIES` and one in :data:`MODEL_TYPES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import FalconConfig
from .config_base import read_config_json
from .falcon import FalconForCausalLM
from .falcon3 import Falcon3ForCausalLM
from .falcon3_config import Falcon3Config
from .falcon_h1 import FalconH1ForCausalLM
from .falcon_mamba import FalconMambaForCausalLM
from .h1_config import FalconH1Config
from .mamba_config import FalconMambaConfig


@dataclass(frozen=True)
class Family:
    """One family: its config and model classes and where its quantizable matrices live.

    ``layers`` is the module path of the decoder layers (``layers.3.<kind>`` names a layer's matrix), ``embedding``
    the module path of the token embedding, ``matrices`` gives [out, in] of every layer matrix kind of a config.
    ``fused_decode`` is why the engine's fused native decode step never runs this family (None: it may, see
    ``falconlm.engine.fused_decode``).
    """

    name: str
    title: str
    config_class: type
    model_class: type
    layers: str
    embedding: str
    matrices: Callable[[Any], dict[str, tuple[int, int]]]
    fused_decode: str | None = None


def _falcon_matrices(c: FalconConfig) -> dict[str, tuple[int, int]]:
    h, f = c.hidden_size, c.ffn_hidden_size
    return {
        "self_attention.query_key_value": (c.qkv_out_features, h),
        "self_attention.dense": (h, h),
        "mlp.dense_h_to_4h": (f, h),
        "mlp.dense_4h_to_h": (h, f),
    }


FAMILIES: dict[str, Family] = {
    "falcon": Family(
        "falcon",
        "Falcon (falcon-rw, 7B, 40B, 180B, Falcon2-11B)",
        FalconConfig,
        FalconForCausalLM,
        "transformer.h",
        "transformer.word_embeddings",
        _falcon_matrices,
    ),
    "falcon3": Family(
        "falcon3",
        "Falcon3 (Llama layout)",
        Falcon3Config,
        Falcon3ForCausalLM,
        "model.layers",
        "model.embed_tokens",
        Falcon3Config.matrix_shapes,
    ),
    "mamba": Family(
        "mamba",
        "Falcon-Mamba (Mamba-1)",
        FalconMambaConfig,
        FalconMambaForCausalLM,
        "backbone.layers",
        "backbone.embeddings",
        FalconMambaConfig.matrix_shapes,
        fused_decode="the fused step is written for Falcon's attention block; Mamba layers (recurrent state, "
        "selective scan) run the torch path",
    ),
    "h1": Family(
        "h1",
        "Falcon-H1 (attention + Mamba-2 in every layer)",
        FalconH1Config,
        FalconH1ForCausalLM,
        "model.layers",
        "model.embed_tokens",
        FalconH1Config.matrix_shapes,
        fused_decode="the fused step is written for Falcon's attention-only block; H1's Mamba-2 + attention "
        "layers run the torch path",
    ),
}

# config.json ``model_type`` -> family name. A family listed here but not (yet) in FAMILIES is recognised and
# refused with its name (the other Falcon families' helpers add their entries).
MODEL_TYPES: dict[str, str] = {
    "falcon": "falcon",
    "RefinedWeb": "falcon",
    "RefinedWebModel": "falcon",
    "llama": "falcon3",
    "falcon_mamba": "mamba",
    "mamba": "mamba",  # plain Mamba-1: the same model without the B/C/Δ norms
    "falcon_h1": "h1",
}

# ``architectures`` entry -> family name, for configs without a model_type.
ARCHITECTURES: dict[str, str] = {
    "FalconForCausalLM": "falcon",
    "RWForCausalLM": "falcon",
    "LlamaForCausalLM": "falcon3",
    "FalconMambaForCausalLM": "mamba",
    "MambaForCausalLM": "mamba",
    "FalconH1ForCausalLM": "h1",
}

DEFAULT_FAMILY = "falcon"  # a config with neither model_type nor architectures (TII's first Falcon configs)


def detect(raw: dict[str, Any]) -> str:
    """The family name of a config.json dict; ValueError naming the field for one falconlm does not know."""
    model_type = raw.get("model_type")
    if model_type is not None:
        if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
            known = ", ".join(f"{t!r}" for t in MODEL_TYPES)
            raise ValueError(f"model_type {model_type!r} is not a Falcon-family model (falconlm reads {known})")
        return MODEL_TYPES[model_type]
    architectures = raw.get("architectures") or []
    if not isinstance(architectures, list):
        raise ValueError(f"architectures must be a list, got {architectures!r}")
    for name in architectures:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    if architectures:
        raise ValueError(f"architectures {architectures!r} name no Falcon-family model (and model_type is missing)")
    return DEFAULT_FAMILY


def family_named(name: str) -> Family:
    """The :class:`Family` called ``name``; ValueError for a family that is recognised but not runnable here."""
    if name not in FAMILIES:
        raise ValueError(f"{name} checkpoints are recognised but not supported by this falconlm build")
    return FAMILIES[name]


def family_of(config: object) -> Family:
    """The family whose config class ``config`` is (an instance of)."""
    for family in FAMILIES.values():
        if isinstance(config, family.config_class):
            return family
    raise TypeError(f"{type(config).__name__} is no family's config class")


def config_from_dict(raw: dict[str, Any]) -> Any:
    """The config object of a config.json dict, in its family's class."""
    return family_named(detect(raw)).config_class.from_dict(raw)


def load_config(path: str | Path) -> Any:
    """The config of a checkpoint folder (or config.json file), in its family's class."""
    return config_from_dict(read_config_json(path))


def build_model(config: Any) -> Any:
    """A fresh model of ``config``'s family (on the current default device)."""
    return family_of(config).model_class(config)
