"""falconlm: run, train and serve the Falcon family of language models on your own hardware.

The public names load on first use (PEP 562), so ``import falconlm`` and the ``falconlm`` command start
without torch: a Ctrl-C during start-up lands inside the command's own handler, not in an import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": ".llm",
    "CompletionOutput": ".engine.outputs",
    "FalconConfig": ".model.config",
    "FalconForCausalLM": ".model.falcon",
    "PoolingParams": ".engine.pooling",
    "RequestOutput": ".engine.outputs",
    "SamplingParams": ".engine.sampling_params",
    "StructuredOutputParams": ".engine.sampling_params",
    "Tokenizer": ".tokenizer",
    "default_model_path": ".default_model",
}

__all__ = [
    "LLM",
    "CompletionOutput",
    "FalconConfig",
    "FalconForCausalLM",
    "PoolingParams",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputParams",
    "Tokenizer",
    "default_model_path",
]

if TYPE_CHECKING:
    from .default_model import default_model_path
    from .engine.outputs import CompletionOutput, RequestOutput
    from .engine.pooling import PoolingParams
    from .engine.sampling_params import SamplingParams, StructuredOutputParams
    from .llm import LLM
    from .model.config import FalconConfig
    from .model.falcon import FalconForCausalLM
    from .tokenizer import Tokenizer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'falconlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
