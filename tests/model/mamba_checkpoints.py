"""Small random Falcon-Mamba / Mamba checkpoints written by transformers, for parity and engine tests."""

from __future__ import annotations

from pathlib import Path

import torch


def hf_mamba(falcon: bool = True, seed: int = 0, **overrides):
    """A random transformers FalconMambaForCausalLM (``falcon``) or MambaForCausalLM, float32, eval mode.

    A_log, D and dt_proj's bias are drawn away from their init so the scan's decays and skip matter."""
    import transformers

    settings = dict(
        vocab_size=97,
        hidden_size=32,
        state_size=8,
        num_hidden_layers=2,
        expand=2,
        conv_kernel=4,
        time_step_rank=6,
        use_conv_bias=True,
        tie_word_embeddings=True,
        eos_token_id=96,
        bos_token_id=0,
        pad_token_id=0,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    if falcon:
        model = transformers.FalconMambaForCausalLM(transformers.FalconMambaConfig(**settings))
    else:
        model = transformers.MambaForCausalLM(transformers.MambaConfig(**settings))
    with torch.no_grad():
        for layer in model.backbone.layers:
            mixer = layer.mixer
            mixer.A_log.add_(0.3 * torch.randn_like(mixer.A_log))
            mixer.D.normal_(1.0, 0.5)
            mixer.dt_proj.bias.normal_(-1.0, 1.0)
            layer.norm.weight.normal_(1.0, 0.2)
        model.backbone.norm_f.weight.normal_(1.0, 0.2)
    return model.eval()


def save_hf_mamba(folder: Path, falcon: bool = True, seed: int = 0, **overrides):
    """Write a random checkpoint to ``folder``; returns the transformers model it came from."""
    model = hf_mamba(falcon, seed, **overrides)
    model.save_pretrained(folder, safe_serialization=True)
    return model
