"""Pooling: how a prompt's hidden states become one embedding vector, and the settings that say how.

The states pooled are the decoder's last hidden states *after* the final LayerNorm (``ln_f``): what transformers
returns as ``last_hidden_state`` (and as ``hidden_states[-1]`` with ``output_hidden_states=True``), which is what
sentence-transformers' ``Transformer`` module hands its ``Pooling`` module for a decoder model. Three poolings:

* ``last``: the last token's state (sentence-transformers' ``pooling_mode_lasttoken``, the usual choice for a
  causal decoder, whose last token is the only one that has seen the whole input);
* ``mean``: the mean over every token (``pooling_mode_mean_tokens``);
* ``cls``: the first token's state (``pooling_mode_cls_token``; rarely useful on a decoder, supported for
  checkpoints that ask for it).

Then optionally the first ``dimensions`` components only (Matryoshka truncation), then L2 normalisation (the
``Normalize`` module). The model's default (pooling and normalisation) comes from its sentence-transformers files
(:func:`read_sentence_transformers_config`) or from the command line (:func:`resolve_pooling_config`); a request's
:class:`PoolingParams` may override it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where the math runs: the CLI reads the names here before loading it
    import torch

logger = logging.getLogger(__name__)

POOLING_TYPES = ("last", "mean", "cls")
TASKS = ("generate", "embed")

# sentence-transformers' Pooling config keys -> our pooling types
_ST_MODES = {
    "pooling_mode_lasttoken": "last",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
}
_ST_UNSUPPORTED = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")


@dataclass(frozen=True)
class PoolingConfig:
    """A model's default pooling: ``pooling_type`` (one of :data:`POOLING_TYPES`) and L2 ``normalize``;
    ``source`` says where it came from (for the log)."""

    pooling_type: str = "last"
    normalize: bool = True
    source: str = "default"

    def __post_init__(self) -> None:
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling must be one of {', '.join(POOLING_TYPES)}, got {self.pooling_type!r}")


@dataclass(frozen=True)
class PoolingParams:
    """What one embedding request asks for (vLLM's name). None fields take the model's :class:`PoolingConfig`.

    ``dimensions`` keeps the first d components (then renormalises when normalising: Matryoshka embeddings).
    Passing a PoolingParams instead of SamplingParams to ``Engine.add_request`` makes the request an embedding
    request: one prefill-only forward, no KV cache (``embedding.py``).
    """

    pooling_type: str | None = None
    normalize: bool | None = None
    dimensions: int | None = None

    def __post_init__(self) -> None:
        if self.pooling_type is not None and self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {', '.join(POOLING_TYPES)}, got {self.pooling_type!r}")
        if self.dimensions is not None and (isinstance(self.dimensions, bool) or self.dimensions < 1):
            raise ValueError(f"dimensions must be >= 1, got {self.dimensions}")

    @property
    def n(self) -> int:
        """One output per request (the engine's front ends read ``params.n``)."""
        return 1


@dataclass
class EmbeddingOutput:
    """One embedding (vLLM's shape): a list of floats."""

    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    """What ``LLM.embed`` returns per prompt: ``outputs.embedding`` is the vector (vLLM's shape)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput

    @property
    def embedding(self) -> list[float]:
        return self.outputs.embedding


# ---- the math ------------------------------------------------------------------------------------------------------


def pool(hidden: torch.Tensor, pooling_type: str) -> torch.Tensor:
    """One vector [H] (float32) from one prompt's final hidden states [T, H]."""
    if pooling_type == "last":
        return hidden[-1].float()
    if pooling_type == "mean":
        return hidden.float().mean(dim=0)
    if pooling_type == "cls":
        return hidden[0].float()
    raise ValueError(f"unknown pooling type {pooling_type!r}")


def finish_embedding(vector: torch.Tensor, normalize: bool, dimensions: int | None = None) -> torch.Tensor:
    """The first ``dimensions`` components (all if None), L2-normalised when ``normalize``."""
    if dimensions is not None:
        vector = vector[:dimensions]
    import torch.nn.functional as F

    return F.normalize(vector, p=2, dim=-1) if normalize else vector


def truncate_prompt(token_ids: list[int], truncate_prompt_tokens: int | None) -> list[int]:
    """The last ``truncate_prompt_tokens`` tokens (vLLM's left truncation), or all of them when None."""
    if truncate_prompt_tokens is None or len(token_ids) <= truncate_prompt_tokens:
        return list(token_ids)
    return list(token_ids[len(token_ids) - truncate_prompt_tokens :])


# ---- where the model's default comes from ------------------------------------------------------------------------


def read_sentence_transformers_config(folder: str | Path) -> PoolingConfig | None:
    """The pooling a sentence-transformers checkpoint declares (``modules.json``, its ``Pooling`` module's
    ``config.json``, and whether a ``Normalize`` module follows); None when the folder has no ``modules.json``.

    ValueError for what cannot be reproduced here: a pooling mode other than last / mean / cls, several modes at
    once, or modules after the pooling that change the vector (``Dense``, ...)."""
    folder = Path(folder)
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{modules_file}: not readable JSON ({exc})") from exc
    if not isinstance(modules, list):
        raise ValueError(f"{modules_file}: expected a list of modules")
    pooling_type, normalize = None, False
    for module in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Transformer":
            continue
        if kind == "Pooling":
            pooling_type = _pooling_mode(folder / str(module.get("path", "")) / "config.json")
        elif kind == "Normalize":
            normalize = True
        else:
            raise ValueError(
                f"{modules_file}: the {kind or 'unnamed'} module is not supported (only Pooling, Normalize)"
            )
    if pooling_type is None:
        raise ValueError(f"{modules_file}: no Pooling module")
    return PoolingConfig(pooling_type, normalize, source=str(modules_file))


def _pooling_mode(config_file: Path) -> str:
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{config_file}: not readable JSON ({exc})") from exc
    unsupported = [key for key in _ST_UNSUPPORTED if config.get(key)]
    if unsupported:
        raise ValueError(f"{config_file}: {', '.join(unsupported)} is not supported (last, mean or cls token only)")
    modes = [kind for key, kind in _ST_MODES.items() if config.get(key)]
    if len(modes) != 1:
        raise ValueError(f"{config_file}: expected exactly one pooling mode of last token, mean or cls, got {modes}")
    return modes[0]


def resolve_pooling_config(folder: str | Path | None, pooling: str | None, normalize: bool | None) -> PoolingConfig:
    """The model's default pooling: the flags (``pooling``, ``normalize``) where given, else the checkpoint's
    sentence-transformers files, else last-token pooling, L2-normalised."""
    base = read_sentence_transformers_config(folder) if folder is not None else None
    base = base or PoolingConfig()
    if pooling is None and normalize is None:
        return base
    source = "flags" if base.source == "default" else f"flags over {base.source}"
    return PoolingConfig(
        pooling if pooling is not None else base.pooling_type,
        normalize if normalize is not None else base.normalize,
        source,
    )
