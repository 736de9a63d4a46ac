"""Falcon-Mamba against transformers' FalconMambaForCausalLM (B/C/Δ norms) and MambaForCausalLM (none)."""

from __future__ import annotations

import pytest
import torch

from falconlm.model.falcon_mamba import FalconMambaForCausalLM
from falconlm.model.formats import load_pretrained

from .mamba_checkpoints import save_hf_mamba

VARIANTS = {
    "falcon-mamba": dict(falcon=True),
    "mamba": dict(falcon=False),
    "falcon-mamba-untied-bias": dict(falcon=True, tie_word_embeddings=False, use_bias=True, use_conv_bias=False),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = save_hf_mamba(folder, **VARIANTS[request.param])
    ours = load_pretrained(folder, torch.float32, "cpu")
    return hf, ours


def test_loads_as_falcon_mamba(pair):
    hf, ours = pair
    assert isinstance(ours, FalconMambaForCausalLM)
    assert ours.config.mixer_rms == (hf.config.model_type == "falcon_mamba")
    assert ours.num_parameters() == hf.num_parameters() == ours.config.num_parameters()


def test_logits_match_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, hf.config.vocab_size, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids, use_cache=False).logits
        got = ours(ids)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_transformers(pair):
    hf, ours = pair
    prompt = torch.randint(0, hf.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    steps = 12
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=steps, do_sample=False, min_new_tokens=steps)[0, 9:].tolist()
    ids = prompt[0].tolist()
    states = ours.new_states(1)
    logits = ours(prompt, states)[0, -1]
    got = []
    for _ in range(steps):
        got.append(int(logits.argmax()))
        logits = ours(torch.tensor([[got[-1]]]), states)[0, -1]
    assert got == expected, (ids, got, expected)


def test_recurrent_decode_equals_full_forward(pair):
    _, ours = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    full = ours(ids)
    states = ours.new_states(2)
    parts = [ours(ids[:, :7], states), ours(ids[:, 7:8], states), ours(ids[:, 8:13], states)]
    parts += [ours(ids[:, t : t + 1], states) for t in range(13, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_missing_tensor_is_reported(tmp_path):
    from safetensors.torch import load_file, save_file

    from falconlm.model.checkpoint import CheckpointError

    save_hf_mamba(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["backbone.layers.1.mixer.A_log"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"backbone\.layers\.1\.mixer\.A_log"):
        load_pretrained(tmp_path, torch.float32, "cpu")
