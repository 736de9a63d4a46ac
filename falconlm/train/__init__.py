"""Training: tokenizers, pretraining and fine-tuning loops, and perplexity evaluation."""

from .args import TrainArgs, TrainResult
from .perplexity import PerplexityResult, perplexity
from .tokenizer_trainer import SPECIAL_TOKENS, train_tokenizer
from .trainer import train

__all__ = [
    "SPECIAL_TOKENS",
    "PerplexityResult",
    "TrainArgs",
    "TrainResult",
    "perplexity",
    "train",
    "train_tokenizer",
]
