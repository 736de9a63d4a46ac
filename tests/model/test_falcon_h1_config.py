"""Falcon-H1 configs (the published 0.5B and 7B as fixtures), loading through the family registry, ``falconlm
info`` and int8 / int4 quantization of H1's linear layers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from falconlm.model.checkpoint import CheckpointError
from falconlm.model.falcon_h1 import FalconH1ForCausalLM
from falconlm.model.families import family_of, load_config
from falconlm.model.h1_config import FalconH1Config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "configs"
PUBLISHED = {"falcon-h1-0.5b-base.json": (36, 1024, 521_411_104), "falcon-h1-7b-base.json": (44, 3072, None)}


def _fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_configs_load_as_h1(name: str, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((FIXTURES / name).read_text())
    config = load_config(tmp_path)
    assert isinstance(config, FalconH1Config) and family_of(config).name == "h1"
    layers, hidden, params = PUBLISHED[name]
    assert (config.num_hidden_layers, config.hidden_size) == (layers, hidden)
    assert config.mamba_d_head * config.mamba_n_heads == config.mamba_d_ssm
    with torch.device("meta"):
        model = FalconH1ForCausalLM(config)
    assert config.num_parameters() == model.num_parameters()
    if params is not None:
        assert config.num_parameters() == params


def test_published_configs_agree_with_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    for name in PUBLISHED:
        raw = _fixture(name)
        theirs, ours = transformers.FalconH1Config(**raw), FalconH1Config.from_dict(raw)
        for field in ("mamba_d_head", "mamba_d_ssm", "mamba_n_groups", "key_multiplier", "ssm_multipliers"):
            assert getattr(ours, field) == getattr(theirs, field), field
        assert ours.head_dim == theirs.head_dim
        again = transformers.FalconH1Config(**ours.to_dict())
        assert again.mlp_multipliers == ours.mlp_multipliers and again.rope_theta == ours.rope_theta


def test_state_and_cache_sizes_of_the_0_5b() -> None:
    config = FalconH1Config.from_dict(_fixture("falcon-h1-0.5b-base.json"))
    assert config.kv_cache_bytes_per_token(2) == 2 * 2 * 64 * 36 * 2  # K and V, 2 KV heads of 64, 36 layers
    conv = 36 * (1536 + 2 * 128) * 3  # x, B, C channels, the last d_conv - 1 inputs
    ssm = 36 * 24 * 64 * 128  # heads x head dim x state size
    assert config.ssm_state_bytes_per_sequence(conv_bytes=2) == conv * 2 + ssm * 4
    assert config.conv_state_shape() == (1792, 3) and config.ssm_state_shape() == (24, 64, 128)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"mamba_d_head": 32}, "mamba_d_head"),
        ({"ssm_multipliers": [1.0, 2.0]}, "ssm_multipliers"),
        ({"mamba_n_groups": 5}, "mamba_n_groups"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling"),
    ],
)
def test_bad_configs_name_the_field(change: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        FalconH1Config.from_dict({**_fixture("falcon-h1-0.5b-base.json"), **change})


def test_info_reports_family_kv_and_state_bytes(tmp_path: Path) -> None:
    from falconlm.cli.info import describe

    (tmp_path / "config.json").write_text((FIXTURES / "falcon-h1-0.5b-base.json").read_text())
    facts = describe(tmp_path, "bfloat16")
    config = FalconH1Config.from_dict(_fixture("falcon-h1-0.5b-base.json"))
    assert facts["family"].startswith("Falcon-H1")
    assert facts["parameters"] == config.num_parameters()
    assert facts["kv_cache_bytes_per_token"] == config.kv_cache_bytes_per_token(2)
    assert facts["ssm_state_bytes_per_sequence"] == config.ssm_state_bytes_per_sequence(conv_bytes=2)
    assert facts["fused_decode_step"].startswith("no (") and "torch path" in facts["fused_decode_step"]


# ---- checkpoints written by transformers -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.FalconH1Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_state=8, mamba_chunk_size=8,
        mamba_rms_norm=True, key_multiplier=0.5, ssm_multipliers=[0.5, 1.5, 0.7, 1.2, 0.9], lm_head_multiplier=0.5,
    )  # fmt: skip
    model = transformers.FalconH1ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.2) if "norm" not in name else p.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp("h1") / "hf"
    model.save_pretrained(folder)
    return folder


def test_transformers_checkpoint_loads_and_round_trips(hf_folder: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.FalconH1ForCausalLM.from_pretrained(hf_folder).eval()
    ours = FalconH1ForCausalLM.from_pretrained(hf_folder)
    assert isinstance(ours, FalconH1ForCausalLM) and not ours.training
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)
        ours.save_pretrained(tmp_path / "ours")
        again = transformers.FalconH1ForCausalLM.from_pretrained(tmp_path / "ours").eval()
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


def test_bf16_load(hf_folder: Path) -> None:
    model = FalconH1ForCausalLM.from_pretrained(hf_folder, dtype=torch.bfloat16)
    assert model.model.layers[0].mamba.in_proj.weight.dtype == torch.bfloat16
    full = FalconH1ForCausalLM.from_pretrained(hf_folder)
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).float().argmax(-1)[:, -1], full(ids).argmax(-1)[:, -1])


def _copy_without(folder: Path, dest: Path, drop: str | None = None, reshape: str | None = None) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    if drop:
        tensors.pop(drop)
    if reshape:
        tensors[reshape] = tensors[reshape][:-1].contiguous()
    dest.mkdir()
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    (dest / "config.json").write_text((folder / "config.json").read_text())
    return dest


def test_loader_errors_name_the_tensor(hf_folder: Path, tmp_path: Path) -> None:
    missing = _copy_without(hf_folder, tmp_path / "missing", drop="model.layers.1.mamba.A_log")
    with pytest.raises(CheckpointError, match=re.escape("missing tensor model.layers.1.mamba.A_log")):
        FalconH1ForCausalLM.from_pretrained(missing)
    wrong = _copy_without(hf_folder, tmp_path / "wrong", reshape="model.layers.0.mamba.in_proj.weight")
    with pytest.raises(CheckpointError, match=re.escape("shape mismatch for model.layers.0.mamba.in_proj.weight")):
        FalconH1ForCausalLM.from_pretrained(wrong)


@pytest.mark.parametrize("spec", ["int8", "int4-g32"])
def test_quantized_h1_stays_close(hf_folder: Path, spec: str) -> None:
    """int8 / int4 on every linear layer of every H1 layer (attention, Mamba in/out, MLP) and the head:
    logits stay close to the float model's (int4's rounding of these random Gaussian matrices is about a tenth
    of their spread, hence the looser bound)."""
    from falconlm.quant import QuantRecipe, is_quantized_model, quantize_model
    from falconlm.quant.linear import QuantizedLinear

    full = FalconH1ForCausalLM.from_pretrained(hf_folder)
    model = quantize_model(FalconH1ForCausalLM.from_pretrained(hf_folder), QuantRecipe.parse(spec), torch.float32)
    assert is_quantized_model(model)
    layer = model.model.layers[0]
    for module in (layer.mamba.in_proj, layer.mamba.out_proj, layer.self_attn.k_proj, layer.feed_forward.down_proj):
        assert isinstance(module, QuantizedLinear)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = full(ids), model(ids)
    cosine = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min()
    assert cosine > (0.999 if spec == "int8" else 0.9)
    assert not torch.equal(a, b)


def test_from_pretrained_quantizes_on_load_and_refuses_other_families(hf_folder: Path) -> None:
    from falconlm.default_model import default_model_path
    from falconlm.quant.linear import QuantizedLinear

    model = FalconH1ForCausalLM.from_pretrained(hf_folder, quantize="int8")
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantizedLinear)
    with pytest.raises(ValueError, match="not a Falcon-H1 one"):
        FalconH1ForCausalLM.from_pretrained(default_model_path())
