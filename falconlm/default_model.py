"""Where the embedded default model lives: package data, so it works with no download."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model_weights"


def default_model_path() -> Path:
    """The folder of the model shipped inside the package (config.json, weights, tokenizer)."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the embedded default model is missing from {DEFAULT_MODEL_DIR}; pass --model PATH to a Falcon checkpoint"
        )
    return DEFAULT_MODEL_DIR
