"""Train a Falcon-style byte-level BPE tokenizer with the ``tokenizers`` library.

The result round-trips any text (the 256 byte symbols are the initial alphabet), keeps Falcon's special tokens
at ids 0..11 (``<|endoftext|>`` is 11), and loads in falconlm's :class:`~falconlm.tokenizer.Tokenizer` as well
as in transformers' ``AutoTokenizer`` / ``PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .documents import END_OF_TEXT, iter_documents

# Falcon's tokenizer.json puts these first, in this order (ids 0..11).
SPECIAL_TOKENS = (
    ">>TITLE<<",
    ">>ABSTRACT<<",
    ">>INTRODUCTION<<",
    ">>SUMMARY<<",
    ">>COMMENT<<",
    ">>ANSWER<<",
    ">>QUESTION<<",
    ">>DOMAIN<<",
    ">>PREFIX<<",
    ">>SUFFIX<<",
    ">>MIDDLE<<",
    END_OF_TEXT,
)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def train_tokenizer(
    files: Sequence[str | Path],
    vocab_size: int,
    out_dir: str | Path,
    *,
    min_frequency: int = 2,
    model_max_length: int = 2048,
    doc_split: str = "eot",
    progress: bool | None = None,
) -> Path:
    """Train on ``files`` and write tokenizer.json + tokenizer_config.json into ``out_dir`` (returned).

    Documents (split on ``<|endoftext|>`` by default) are fed separately so no merge spans two of them.
    """
    if vocab_size < MIN_VOCAB:
        raise ValueError(
            f"vocab size must be at least {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special "
            f"tokens), got {vocab_size}"
        )
    paths = [Path(f) for f in files]
    if not paths:
        raise ValueError("no input files given")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"input file not found: {p}")
    show = sys.stderr.isatty() if progress is None else progress

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show,
    )
    tok.train_from_iterator(_documents(paths, doc_split), trainer)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": END_OF_TEXT,
        "eos_token": END_OF_TEXT,
        "additional_special_tokens": list(SPECIAL_TOKENS[:-1]),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return out


def _documents(paths: list[Path], doc_split: str) -> Iterator[str]:
    for path in paths:
        yield from iter_documents(path, doc_split)
