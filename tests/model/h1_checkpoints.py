"""Small random Falcon-H1 checkpoints written by transformers, for the engine, LLM and server tests."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from falconlm.default_model import default_model_path

H1_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "mamba_d_ssm": 64,
    "mamba_n_heads": 4,
    "mamba_n_groups": 2,
    "mamba_d_state": 8,
    "mamba_chunk_size": 8,
    "mamba_rms_norm": True,
    "max_position_embeddings": 256,
    "embedding_multiplier": 1.5,
    "key_multiplier": 0.5,
    "ssm_out_multiplier": 0.8,
    "ssm_multipliers": [0.5, 1.5, 0.7, 1.2, 0.9],
    "mlp_multipliers": [0.8, 1.3],
    "lm_head_multiplier": 0.7,
}


def save_hf_h1(folder: Path, vocab_size: int = 97, with_tokenizer: bool = False, **overrides: Any) -> Path:
    """A random transformers FalconH1ForCausalLM saved to ``folder`` (weights spread wide enough that greedy
    tokens vary); ``with_tokenizer`` copies the embedded default model's tokenizer (vocabulary 4096)."""
    import transformers

    if with_tokenizer:
        vocab_size = 4096
        overrides = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, **overrides}
    torch.manual_seed(0)
    config = transformers.FalconH1Config(vocab_size=vocab_size, **{**H1_SHAPE, **overrides})
    model = transformers.FalconH1ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3) if "norm" not in name else p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    if with_tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(default_model_path() / name, folder / name)
    return folder
