"""Checkpoint formats beyond plain Hugging Face folders: a registry that the quant package fills.

The model layer reads plain checkpoints itself (``checkpoint.py``). A folder that says it is quantized
(config.json's ``quantization_config``, or AutoGPTQ's ``quantize_config.json``), or a load that asks to quantize,
needs :mod:`falconlm.quant`, which sits above the model in the layering: when imported it registers one loader
per ``quant_method`` it reads (:func:`register_format`), plus one for quantizing on load (:data:`ON_LOAD`). The
model never imports it statically. :func:`load_pretrained` imports it by name (:data:`QUANT_PACKAGE`, the one
by-name import) the first time such a folder is met, as transformers picks a quantizer from the config.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .checkpoint import CheckpointError, load_model

if TYPE_CHECKING:
    from .falcon import FalconForCausalLM

QUANT_PACKAGE = "falconlm.quant"  # imported by name when a quantized folder is met; it registers its formats
ON_LOAD = "quantize-on-load"  # the loader that quantizes a plain folder (``quantize="int8"``...)
GPTQ_SETTINGS_FILE = "quantize_config.json"  # AutoGPTQ's settings beside a config.json without the block


class FormatLoader(Protocol):
    """Loads ``folder`` in ``dtype`` on ``device``; ``quantize`` names a recipe to quantize with on load."""

    def __call__(
        self, folder: Path, dtype: torch.dtype, device: str | torch.device, quantize: Any
    ) -> FalconForCausalLM: ...


_LOADERS: dict[str, FormatLoader] = {}


def register_format(method: str, loader: FormatLoader) -> None:
    """Make folders whose ``quantization_config`` names ``method`` (or :data:`ON_LOAD`) load through ``loader``."""
    _LOADERS[method] = loader


def quant_method(folder: Path) -> str | None:
    """The quantization method a checkpoint folder was stored with, None for a plain folder (or one whose
    config.json cannot be read: loading the config reports that). A ``quantization_config`` without a
    ``quant_method`` string gives its repr, which no format registers."""
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    block = raw.get("quantization_config") if isinstance(raw, dict) else None
    if block is not None:
        method = block.get("quant_method") if isinstance(block, dict) else block
        return method if isinstance(method, str) else repr(method)
    return "gptq" if (folder / GPTQ_SETTINGS_FILE).is_file() else None


def load_pretrained(
    path: str | Path, dtype: torch.dtype, device: str | torch.device, quantize: Any = None
) -> FalconForCausalLM:
    """Any checkpoint folder: a plain one as stored (or quantized on load with ``quantize``), a quantized one
    through the loader registered for its method."""
    folder = Path(path)
    method = quant_method(folder)
    if method is None and quantize is None:
        return load_model(folder, dtype=dtype, device=device)
    return loader_for(ON_LOAD if method is None else method)(folder, dtype, device, quantize)


def loader_for(method: str) -> FormatLoader:
    """The loader registered for ``method``, importing :data:`QUANT_PACKAGE` first if it has not registered yet."""
    if method not in _LOADERS:
        importlib.import_module(QUANT_PACKAGE)
    if method not in _LOADERS:
        known = ", ".join(repr(m) for m in sorted(_LOADERS) if m != ON_LOAD)
        raise CheckpointError(f"quantization method {method!r} is not supported (falconlm reads {known})")
    return _LOADERS[method]
