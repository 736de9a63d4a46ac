"""The checkpoint the tool-calling tests run on: the embedded default model, with room for a tool prompt."""

from __future__ import annotations

import json
from pathlib import Path

from falconlm import default_model_path

STRETCHED_CONTEXT = 1024


def stretched_default_model(folder: Path) -> Path:
    """The embedded default model with its 256-token context stretched to ``STRETCHED_CONTEXT`` by dynamic-NTK
    RoPE scaling (unchanged up to 256 positions): a prompt listing tools, in its 4k-token vocabulary, needs more
    than 256. Weights and tokenizer are linked, not copied. Serve it with ``max_model_len=STRETCHED_CONTEXT``."""
    source = default_model_path()
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).symlink_to(source / name)
    config = json.loads((source / "config.json").read_text())
    config["rope_scaling"] = {"type": "dynamic", "factor": STRETCHED_CONTEXT / config["max_position_embeddings"]}
    (folder / "config.json").write_text(json.dumps(config))
    return folder
