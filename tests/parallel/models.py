"""Tiny random Falcon and Falcon3 checkpoints for the tensor-parallel tests, and the calls every rank makes."""

from __future__ import annotations

from pathlib import Path

import torch

from falconlm.model.config import FalconConfig
from falconlm.model.falcon import FalconForCausalLM
from falconlm.model.falcon3 import Falcon3ForCausalLM
from falconlm.model.falcon3_config import Falcon3Config

VOCAB = 101  # splits unevenly over 2 and 3 ranks
FALCON = {
    # falcon-rw: sequential, ALiBi, biases, one KV head per query head
    "rw": {"parallel_attn": False, "alibi": True, "bias": True, "multi_query": False, "num_attention_heads": 4},
    # falcon-7b style: multi-query, 7 heads in one KV group (Falcon-7B's 71 heads in miniature)
    "7b": {"hidden_size": 56, "num_attention_heads": 7, "multi_query": True},
    # falcon-40b style: grouped-query, ln_attn + ln_mlp (2 groups: shared by ranks on 3 ranks)
    "40b": {"new_decoder_architecture": True, "num_attention_heads": 8, "num_kv_heads": 2},
    # Falcon2-11B style: grouped-query, one LayerNorm, untied head; biases to check they are added once
    "11b": {
        "new_decoder_architecture": True, "num_ln_in_parallel_attn": 1, "num_attention_heads": 8,
        "num_kv_heads": 4, "tie_word_embeddings": False, "bias": True,
    },
    # 5 KV groups: uneven whole-group shares (3 + 2 on 2 ranks, 2 + 2 + 1 on 3)
    "5groups": {"hidden_size": 80, "new_decoder_architecture": True, "num_attention_heads": 10, "num_kv_heads": 5},
}  # fmt: skip
FALCON3 = {
    "gqa": {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": False},
    "tied": {"num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": True, "mlp_bias": True},
    "mqa-bias": {"num_attention_heads": 6, "num_key_value_heads": 1, "attention_bias": True},
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (LayerNorm and bias included), so a misplaced slice shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def write_falcon(out: Path, variant: str, seed: int = 0, **overrides: object) -> Path:
    base = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "bos_token_id": 0, "eos_token_id": 0}
    config = FalconConfig(**{**base, **FALCON.get(variant, {}), **overrides})
    model = FalconForCausalLM(config)
    _randomize(model, seed)
    model.save_pretrained(out)
    return out


def write_falcon3(out: Path, variant: str, seed: int = 0, **overrides: object) -> Path:
    base = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2}
    model = Falcon3ForCausalLM(Falcon3Config(**{**base, **FALCON3.get(variant, {}), **overrides}))
    _randomize(model, seed)
    model.save_pretrained(out)
    return out


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of token ids, the first left-padded by two (the mask exercises padding and ALiBi positions)."""
    ids = torch.tensor([[0, 0, 5, 17, 99, 3, 42], [7, 100, 1, 64, 8, 50, 23]])
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids, mask


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    """The HF-style call on :func:`inputs`, then one cached decode step (prefill logits and decode logits)."""
    ids, mask = inputs()
    cache = model.new_kv_cache(ids.shape[0], ids.shape[1] + 1)
    first = model(ids, attention_mask=mask, kv_cache=cache)
    nxt = first[:, -1].argmax(-1, keepdim=True)
    second = model(nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1), kv_cache=cache)
    return torch.cat([first, second], dim=1).float()


@torch.no_grad()
def paged_logits(model: torch.nn.Module) -> torch.Tensor:
    """Two prompts flattened into one engine-style step over a paged cache, then a decode step of both: the
    last-token logits of each step (the paged attention path, ALiBi slopes from the model's config)."""
    from falconlm.model.paged_attention import PagedKVCache

    from ..model.paged_step import paged_step

    cfg = model.config
    prompts = [[3, 9, 27, 81 % VOCAB, 43, 29, 87], [5, 25, 24, 19, 94]]
    tables = [[0, 1, 2], [3, 4, 5]]
    cache = PagedKVCache.allocate(cfg.num_hidden_layers, 6, 4, cfg.num_kv_groups, cfg.head_dim, torch.float32, "cpu")
    first = paged_step(model, cache, tables, prompts, [0, 0])
    following = [[int(first[row].argmax())] for row in range(2)]
    return torch.cat([first, paged_step(model, cache, tables, following, [len(p) for p in prompts])])
