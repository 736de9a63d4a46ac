"""The model a training run starts from: fresh from a preset or config, an existing checkpoint, or OUT."""

from __future__ import annotations

from pathlib import Path

import torch

from ..model.config import PRESETS, FalconConfig, preset
from ..model.falcon import FalconForCausalLM
from ..tokenizer import Tokenizer
from .args import TrainArgs


def resolve_config(config: str | Path | FalconConfig | None) -> tuple[FalconConfig, bool]:
    """(config, is_preset) for a preset name, a config.json or its folder, or a FalconConfig."""
    if config is None:
        raise ValueError("--config is required (a preset name or a config.json), unless --init-from is given")
    if isinstance(config, FalconConfig):
        return FalconConfig.from_dict(config.to_dict()), False
    if str(config) in PRESETS:
        return preset(str(config)), True
    path = Path(config)
    if not path.exists():
        raise FileNotFoundError(
            f"--config {config} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing config.json"
        )
    return FalconConfig.from_pretrained(path), False


def fit_config(config: FalconConfig, tokenizer: Tokenizer, args: TrainArgs, resize_vocab: bool) -> FalconConfig:
    """The config adjusted to the tokenizer (vocab, bos/eos ids), the sequence length and --dropout."""
    d = config.to_dict()
    vocab = tokenizer.vocab_size
    if resize_vocab:
        d["vocab_size"] = vocab
    elif config.vocab_size < vocab:
        raise ValueError(f"the model's vocab_size ({config.vocab_size}) is smaller than the tokenizer's ({vocab})")
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id
    d["eos_token_id"] = eos
    d["bos_token_id"] = eos if bos is None else bos
    if args.seq_len > config.max_position_embeddings:
        raise ValueError(
            f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings ({config.max_position_embeddings})"
        )
    if args.dropout is not None:
        d["hidden_dropout"] = d["attention_dropout"] = args.dropout
    return FalconConfig.from_dict(d)


def build_model(
    args: TrainArgs, tokenizer: Tokenizer, resume_dir: Path | None, device: torch.device
) -> FalconForCausalLM:
    """The float32 model in train mode on ``device``: resumed, initialised from a checkpoint, or fresh."""
    if resume_dir is not None:
        model = FalconForCausalLM.from_pretrained(resume_dir, dtype=torch.float32, device=device)
        return model.train()
    if args.init_from is not None:
        source = FalconForCausalLM.from_pretrained(args.init_from, dtype=torch.float32, device="cpu")
        config = fit_config(source.config, tokenizer, args, resize_vocab=False)
        model = FalconForCausalLM(config)
        model.load_state_dict(source.state_dict())
        del source
    else:
        config, is_preset = resolve_config(args.config)
        config = fit_config(config, tokenizer, args, resize_vocab=is_preset)
        torch.manual_seed(args.seed)
        model = FalconForCausalLM(config)
        model.init_weights(args.seed)
    return model.to(device).train()
