"""Checkpoints: the model in Hugging Face layout plus ``training_state.pt`` beside it, written atomically.

Every file is first written into ``OUT/.checkpoint-tmp`` and then renamed into ``OUT`` (the training state
last), so an interrupted save never leaves a half-written file behind. The state holds only tensors, dicts,
lists and plain scalars, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..model.falcon import FalconForCausalLM

STATE_FILE = "training_state.pt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TMP_DIR = ".checkpoint-tmp"


def save_checkpoint(out: Path, model: FalconForCausalLM, tokenizer_dir: Path, state: dict[str, Any]) -> None:
    """Write weights, config, tokenizer files and the training state into ``out``."""
    tmp = out / TMP_DIR
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    if tokenizer_dir.resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, tmp / name)
    torch.save(state, tmp / STATE_FILE)
    # Weight files first, the state last: the state names the step the weights belong to.
    names = sorted(p.name for p in tmp.iterdir() if p.name != STATE_FILE)
    for stale in out.glob("model*.safetensors*"):
        if stale.name not in names:
            stale.unlink()
    for name in [*names, STATE_FILE]:
        os.replace(tmp / name, out / name)
    tmp.rmdir()


def load_state(out: Path) -> dict[str, Any]:
    """The training state of ``out``; FileNotFoundError when there is none."""
    file = out / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"cannot resume: no {STATE_FILE} in {out}")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise ValueError(f"cannot read {file}: {exc}") from exc


def rng_state() -> dict[str, Any]:
    """Torch's CPU (and CUDA) generator states."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
