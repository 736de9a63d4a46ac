"""RoPE scaling from the config (linear, dynamic NTK) as transformers' Falcon computes it, and how the engine
applies dynamic scaling to requests of different lengths (falconlm/model/positions.py)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import FalconConfig as HFConfig
from transformers.models.falcon.modeling_falcon import FalconRotaryEmbedding

from falconlm import FalconForCausalLM
from falconlm.model.config import FalconConfig, RopeScaling
from falconlm.model.positions import (
    engine_rope_length,
    is_dynamic,
    prompt_rope_salt,
    rope_cos_sin,
    rope_inv_freq,
)

SHAPE = {"hidden_size": 32, "num_attention_heads": 2, "max_position_embeddings": 2048}


@pytest.mark.parametrize("kind", ["linear", "dynamic"])
@pytest.mark.parametrize("length", [100, 2048, 2049, 3000, 8200, 50_000])
def test_frequencies_and_tables_are_bit_equal_to_transformers(kind: str, length: int) -> None:
    scaling = {"type": kind, "factor": 8.0}
    ref = FalconRotaryEmbedding(HFConfig(**SHAPE, rope_scaling=scaling))  # fresh: its dynamic state is per call
    config = FalconConfig.from_dict({**SHAPE, "rope_scaling": scaling})
    positions = torch.arange(length)[None]
    cos, sin = ref(torch.zeros(1), positions)
    ours_cos, ours_sin = rope_cos_sin(config, positions, torch.float32)
    assert torch.equal(ref.inv_freq, rope_inv_freq(config, length))
    assert torch.equal(cos[0], ours_cos[0, :, 0, 0]) and torch.equal(sin[0], ours_sin[0, :, 0, 0])


def test_dynamic_scaling_leaves_the_trained_range_alone_and_stretches_beyond_it() -> None:
    config = FalconConfig(**SHAPE, rope_scaling=RopeScaling("dynamic", 4.0))
    plain = rope_inv_freq(FalconConfig(**SHAPE))
    assert torch.equal(rope_inv_freq(config, 2048), plain) and torch.equal(rope_inv_freq(config), plain)
    longer = rope_inv_freq(config, 4096)
    assert longer[0] == 1.0 and (longer[1:] < plain[1:]).all()  # a larger base: slower rotations
    assert (rope_inv_freq(config, 8192)[1:] < longer[1:]).all()


def test_linear_scaling_equals_dividing_the_positions() -> None:
    config = FalconConfig(**SHAPE, rope_scaling=RopeScaling("linear", 4.0))
    positions = torch.arange(0, 8000, 4)[None]
    cos, _ = rope_cos_sin(config, positions, torch.float32)
    plain, _ = rope_cos_sin(FalconConfig(**SHAPE), positions // 4, torch.float32)
    assert torch.allclose(cos, plain, atol=1e-4)


def test_per_token_lengths_give_each_sequence_its_own_frequencies() -> None:
    config = FalconConfig(**SHAPE, rope_scaling=RopeScaling("dynamic", 8.0))
    a, b = torch.arange(5000, 5004), torch.arange(2995, 3000)  # two sequences' tokens in one flattened step
    positions = torch.cat([a, b])[None]
    lengths = torch.tensor([[6000] * 4 + [3000] * 5])
    cos, sin = rope_cos_sin(config, positions, torch.float32, lengths)
    alone_a = rope_cos_sin(config, a[None], torch.float32, torch.full((1, 4), 6000))
    alone_b = rope_cos_sin(config, b[None], torch.float32)  # one call: its own max position + 1 = 3000
    assert torch.equal(cos[:, :4], alone_a[0]) and torch.equal(sin[:, :4], alone_a[1])
    assert torch.equal(cos[:, 4:], alone_b[0]) and torch.equal(sin[:, 4:], alone_b[1])
    # Without lengths the whole call shares one length (the batch's longest), as one transformers forward does.
    shared, _ = rope_cos_sin(config, positions, torch.float32)
    assert not torch.equal(shared[:, 4:], alone_b[0])
    # Linear scaling ignores lengths.
    linear = FalconConfig(**SHAPE, rope_scaling=RopeScaling("linear", 8.0))
    assert torch.equal(
        rope_cos_sin(linear, positions, torch.float32, lengths)[0], rope_cos_sin(linear, positions, torch.float32)[0]
    )


def test_engine_lengths_follow_generate_for_one_request() -> None:
    # Prompt tokens take the prompt's length (one prefill, however it is chunked); later tokens their own.
    assert [engine_rope_length(3000, p) for p in (0, 1500, 2999)] == [3000, 3000, 3000]
    assert [engine_rope_length(3000, p) for p in (3000, 3001, 4000)] == [3001, 3002, 4001]
    assert engine_rope_length(10, 50) == 51


def test_prefix_salt_only_where_keys_depend_on_the_prompt_length() -> None:
    dynamic = FalconConfig(**SHAPE, rope_scaling=RopeScaling("dynamic", 8.0))
    assert is_dynamic(dynamic)
    assert prompt_rope_salt(dynamic, 2048) is None and prompt_rope_salt(dynamic, 2049) == 2049
    linear = FalconConfig(**SHAPE, rope_scaling=RopeScaling("linear", 8.0))
    assert not is_dynamic(linear) and prompt_rope_salt(linear, 9000) is None
    assert prompt_rope_salt(FalconConfig(**SHAPE), 9000) is None


@pytest.mark.parametrize(
    "scaling, match",
    [
        ({"type": "yarn", "factor": 4.0}, "rope_scaling type 'yarn' is not supported"),
        ({"rope_type": "llama3", "factor": 8.0}, "rope_scaling type 'llama3' is not supported"),
        ({"type": "longrope", "factor": 2.0}, "rope_scaling type 'longrope' is not supported"),
        ({"type": "linear"}, "rope_scaling factor is required"),
        ({"rope_type": "dynamic", "factor": "2"}, "rope_scaling factor must be a number"),
        ({"type": "linear", "factor": 0.5}, "rope_scaling factor must be >= 1"),
        ("linear", "rope_scaling must be an object"),
    ],
)
def test_unsupported_scaling_is_a_config_error_at_load(tmp_path, scaling, match) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon", **SHAPE, "rope_scaling": scaling}))
    with pytest.raises(ValueError, match=match):
        FalconForCausalLM.from_pretrained(tmp_path)


def test_both_key_spellings_are_read_and_round_trip() -> None:
    for key in ("type", "rope_type"):
        config = FalconConfig.from_dict({**SHAPE, "rope_scaling": {key: "dynamic", "factor": 2.0}})
        assert config.rope_scaling == RopeScaling("dynamic", 2.0)
        assert FalconConfig.from_dict(config.to_dict()).rope_scaling == config.rope_scaling
        assert HFConfig(**config.to_dict()).rope_scaling["factor"] == 2.0
