"""Falcon-H1 against transformers' ``FalconH1ForCausalLM`` on small random checkpoints built here.

fp32 logits within 1e-4 for several ratios of attention to SSM heads with the µP multipliers away from 1, both
Mamba output norms (gated RMSNorm before / after the gate, or none), grouped B/C and a tied head; greedy
generation equal to transformers' ``generate``; cached attention + recurrent decode equal to the full forward.

transformers 4.57's own cached decode is wrong for ``mamba_rms_norm`` with more than one row (its gated norm
squeezes the time axis, so [B, d] meets [B, 1, h] and broadcasts to [B, B, h]); the generate comparisons with
that norm therefore run one row at a time. Its generate with a left-padding mask fails inside SDPA, so padded
batches are compared on the forward (real positions) and through our own cached decode.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from falconlm.model.falcon_h1 import FalconH1ForCausalLM  # noqa: E402
from falconlm.model.h1_config import FalconH1Config  # noqa: E402

MULTIPLIERS = {
    "embedding_multiplier": 1.7,
    "lm_head_multiplier": 0.3,
    "attention_in_multiplier": 1.3,
    "attention_out_multiplier": 0.8,
    "key_multiplier": 0.6,
    "ssm_in_multiplier": 1.25,
    "ssm_out_multiplier": 0.7,
    "ssm_multipliers": [0.5, 1.5, 0.7, 1.2, 0.9],
    "mlp_multipliers": [0.8, 1.3],
}
BASE = {
    "vocab_size": 97,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "rope_theta": 10000.0,
    "mamba_d_conv": 4,
    "mamba_d_state": 8,
    "mamba_chunk_size": 8,
    "tie_word_embeddings": False,
}
# attention heads / KV heads / head dim against Mamba heads / head dim / groups: attention-heavy, SSM-heavy, even
SHAPES = {
    "attn8-kv8-ssm2": dict(num_attention_heads=8, num_key_value_heads=8, head_dim=8, mamba_n_heads=2, mamba_d_ssm=32),
    "attn2-kv1-ssm12": dict(
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, mamba_n_heads=12, mamba_d_ssm=96
    ),
    "attn4-kv2-ssm6-g2": dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, mamba_n_heads=6, mamba_d_ssm=48, mamba_n_groups=2
    ),
}
NORMS = {
    "plain-gate": dict(mamba_rms_norm=False),
    "norm-before-gate": dict(mamba_rms_norm=True, mamba_norm_before_gate=True),
    "norm-after-gate": dict(mamba_rms_norm=True, mamba_norm_before_gate=False),
}


def build_pair(seed: int = 0, **overrides: Any) -> tuple[Any, FalconH1ForCausalLM]:
    """A random transformers FalconH1ForCausalLM (norms, A, D and Δ bias away from their defaults) and ours with
    the same weights, both fp32 in eval mode."""
    torch.manual_seed(seed)
    hf_config = transformers.FalconH1Config(**{**BASE, **overrides})
    hf = transformers.FalconH1ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("dt_bias", "A_log", ".D")):
                p.uniform_(0.1, 1.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    ours = FalconH1ForCausalLM(FalconH1Config.from_dict(hf_config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def greedy(model: FalconH1ForCausalLM, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy tokens through our cached attention + recurrent decode."""
    cache = model.new_cache(ids.shape[0], ids.shape[1] + steps)
    logits = model(ids, cache=cache, last_token_only=True)
    out = []
    for _ in range(steps):
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
        logits = model(token, cache=cache)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_logits_match_transformers(shape: str, norm: str) -> None:
    hf, ours = build_pair(**SHAPES[shape], **NORMS[norm], **MULTIPLIERS)
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = hf(ids).logits, ours(ids)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_multipliers_matter() -> None:
    """The multipliers are applied where transformers applies them: the same weights without them differ."""
    hf, ours = build_pair(**SHAPES["attn4-kv2-ssm6-g2"], **MULTIPLIERS)
    _, plain = build_pair(**SHAPES["attn4-kv2-ssm6-g2"])
    plain.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(ids) - plain(ids)).abs().max() > 1e-2
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_tied_head_matches_transformers() -> None:
    hf, ours = build_pair(**SHAPES["attn4-kv2-ssm6-g2"], **MULTIPLIERS, tie_word_embeddings=True)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_left_padded_batch_matches_transformers_on_real_tokens() -> None:
    hf, ours = build_pair(**SHAPES["attn4-kv2-ssm6-g2"], **NORMS["norm-after-gate"], **MULTIPLIERS)
    ids = torch.randint(0, 97, (2, 15), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 15, dtype=torch.long)
    mask[1, :6] = 0
    with torch.no_grad():
        expected, got = hf(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask)
        alone = ours(ids[1:, 6:])  # the padded row without its padding
    torch.testing.assert_close(got[0], expected[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1, 6:], expected[1, 6:], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1, 6:], alone[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("norm", NORMS)
def test_greedy_generation_matches_transformers(norm: str) -> None:
    hf, ours = build_pair(**SHAPES["attn4-kv2-ssm6-g2"], **NORMS[norm], **MULTIPLIERS)
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(5))
    rows = [ids[:1], ids[1:]] if NORMS[norm]["mamba_rms_norm"] else [ids]  # see module docstring
    for prompt in rows:
        with torch.no_grad():
            expected = hf.generate(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10)
            got = greedy(ours, prompt, 10)
        assert got.tolist() == expected[:, prompt.shape[1] :].tolist()


@pytest.mark.parametrize("shape", SHAPES)
def test_cached_recurrent_decode_equals_full_forward(shape: str) -> None:
    """Prompt, then a second chunk continuing the state (chunked prefill), then one-token steps: every logit
    row equals the full forward's over the whole sequence."""
    _, ours = build_pair(**SHAPES[shape], **NORMS["norm-before-gate"], **MULTIPLIERS)
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(2, 30)
        parts = [ours(ids[:, :11], cache=cache), ours(ids[:, 11:20], cache=cache)]
        parts += [ours(ids[:, t : t + 1], cache=cache) for t in range(20, 30)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=0)


def test_left_padded_cached_decode_equals_each_row_alone() -> None:
    _, ours = build_pair(**SHAPES["attn2-kv1-ssm12"], **NORMS["norm-after-gate"], **MULTIPLIERS)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0
    with torch.no_grad():
        cache = ours.new_cache(2, 20)
        logits = ours(ids, attention_mask=mask, cache=cache, last_token_only=True)
        tokens = []
        for _ in range(6):
            token = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            logits = ours(token, attention_mask=mask, cache=cache)
        together = torch.cat(tokens, dim=1)
        assert together[0].tolist() == greedy(ours, ids[:1, 4:], 6)[0].tolist()
        assert together[1].tolist() == greedy(ours, ids[1:], 6)[0].tolist()
