"""Tiny random Falcon3 (Llama-layout) checkpoints built with transformers' LlamaForCausalLM, for the tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..conftest import TINY_BASE, TOKENIZER_TEXT

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "configs"
CHAT_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"]  # Falcon3-Instruct's chat markers

BASE = {
    "vocab_size": TINY_BASE["vocab_size"],
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "max_position_embeddings": 128,
    "rope_theta": 1000042.0,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 0,
    "eos_token_id": 0,
}

# The shapes that matter (issue 15): grouped-query with a wide explicit head_dim and an untied head (Falcon3's own
# layout), a tied head with plain multi-head attention, biases with one KV head, and RoPE scaling.
VARIANTS = {
    "gqa": {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": False},
    "tied": {"num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": True},
    "bias": {"num_attention_heads": 4, "num_key_value_heads": 1, "attention_bias": True, "mlp_bias": True},
    "linear-rope": {
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 16,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
    },
    "dynamic-rope": {
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 16,
        "rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
    },
}


def make_chat_tokenizer(out_dir: Path) -> None:
    """A byte-level BPE tokenizer (vocab 320) with Falcon3-Instruct's chat markers as special tokens, and the
    published Falcon3 chat template (``tests/fixtures/configs``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BASE["vocab_size"],
        special_tokens=CHAT_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TOKENIZER_TEXT] * 4, trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = json.loads((FIXTURES / "falcon3-1b-instruct.tokenizer_config.json").read_text())
    config.pop("pad_token")  # the tiny vocabulary has no pad token
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))


def make_falcon3_checkpoint(out_dir: Path, variant: str = "gqa", seed: int = 0, **overrides) -> Path:
    """Save a random transformers LlamaForCausalLM of ``variant`` (plus the chat tokenizer) into ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**BASE, **VARIANTS[variant], **overrides})
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    make_chat_tokenizer(out_dir)
    return out_dir


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
