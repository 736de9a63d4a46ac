"""falconlm: run, train and serve the Falcon family of language models on your own hardware."""

from .default_model import default_model_path
from .engine.outputs import CompletionOutput, RequestOutput
from .engine.sampling_params import SamplingParams
from .llm import LLM
from .model.config import FalconConfig
from .model.falcon import FalconForCausalLM
from .tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "CompletionOutput",
    "FalconConfig",
    "FalconForCausalLM",
    "RequestOutput",
    "SamplingParams",
    "Tokenizer",
    "default_model_path",
]
