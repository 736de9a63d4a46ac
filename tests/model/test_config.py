"""Config reading: native and legacy forms, the KV-group rule, rope forms, named errors, real configs."""

from __future__ import annotations

import json

import pytest
import torch

from falconlm import FalconConfig, FalconForCausalLM
from falconlm.cli import main as cli_main

NATIVE_7B = {
    "model_type": "falcon",
    "hidden_size": 4544,
    "num_attention_heads": 71,
    "num_hidden_layers": 32,
    "multi_query": True,
    "parallel_attn": True,
    "new_decoder_architecture": False,
    "bias": False,
    "alibi": False,
    "bos_token_id": 11,
    "eos_token_id": 11,
}


def test_multi_query_has_one_kv_group_whatever_num_kv_heads_says():
    cfg = FalconConfig.from_dict({**NATIVE_7B, "num_kv_heads": 71})
    assert cfg.num_kv_groups == 1
    assert cfg.qkv_out_features == 4544 + 2 * 64


def test_group_rule_for_each_variant():
    rw = FalconConfig(hidden_size=2048, num_attention_heads=32, multi_query=False, parallel_attn=False)
    gqa = FalconConfig(hidden_size=8192, num_attention_heads=128, num_kv_heads=8, new_decoder_architecture=True)
    assert (rw.num_kv_groups, rw.queries_per_kv, rw.qkv_out_features) == (32, 1, 3 * 2048)
    assert (gqa.num_kv_groups, gqa.queries_per_kv, gqa.qkv_out_features) == (8, 16, 9216)
    assert gqa.num_ln_in_parallel_attn == 2 and gqa.layer_norms == ("ln_attn", "ln_mlp")


def test_legacy_refinedweb_names_map_to_native():
    legacy = {
        "model_type": "RefinedWebModel",
        "n_head": 71,
        "n_layer": 32,
        "hidden_size": 4544,
        "multi_query": True,
        "parallel_attn": True,
        "bias": False,
        "alibi": False,
        "bos_token_id": 11,
        "eos_token_id": 11,
    }
    a, b = FalconConfig.from_dict(legacy), FalconConfig.from_dict(NATIVE_7B)
    assert a.to_dict() == b.to_dict()
    big = FalconConfig.from_dict(
        {
            "model_type": "RefinedWeb",
            "n_head": 128,
            "n_head_kv": 8,
            "n_layer": 60,
            "hidden_size": 8192,
            "parallel_attn": True,
        }
    )
    assert big.new_decoder_architecture and big.num_kv_groups == 8 and big.num_hidden_layers == 60


def test_legacy_and_native_tiny_models_compute_the_same():
    legacy = {
        "model_type": "RefinedWebModel",
        "n_head": 4,
        "n_layer": 2,
        "n_embed": 64,
        "vocab_size": 100,
        "multi_query": True,
        "parallel_attn": True,
    }
    native = {
        "model_type": "falcon",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "vocab_size": 100,
        "multi_query": True,
        "parallel_attn": True,
        "new_decoder_architecture": False,
    }
    torch.manual_seed(0)
    a = FalconForCausalLM(FalconConfig.from_dict(legacy)).eval()
    b = FalconForCausalLM(FalconConfig.from_dict(native)).eval()
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"model_type": "llama"}, "model_type"),
        ({"hidden_size": 100, "num_attention_heads": 3}, "hidden_size"),
        ({"new_decoder_architecture": True, "num_attention_heads": 71, "num_kv_heads": 8}, "num_kv_heads"),
        ({"new_decoder_architecture": True, "parallel_attn": False}, "parallel_attn"),
        ({"num_ln_in_parallel_attn": 3, "new_decoder_architecture": True}, "num_ln_in_parallel_attn"),
        ({"activation": "relu"}, "activation"),
        ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_scaling"),
        ({"rope_scaling": {"type": "linear", "factor": 0.5}}, "rope_scaling"),
        ({"alibi": True, "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"model_type": "RefinedWeb", "n_head": 8, "num_attention_heads": 16}, "n_head"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"rope_theta": 1000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 10.0}}, "rope_theta"),
    ],
)
def test_bad_values_name_the_field(raw, field):
    with pytest.raises(ValueError, match=field):
        FalconConfig.from_dict(raw)


def test_rope_forms_4x_and_5x():
    old = FalconConfig.from_dict({"rope_theta": 500042.0, "rope_scaling": {"type": "dynamic", "factor": 4.0}})
    new = FalconConfig.from_dict({"rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 500042.0}})
    assert old.rope_theta == new.rope_theta == 500042.0
    assert old.rope_scaling == new.rope_scaling and old.rope_scaling.rope_type == "dynamic"


def test_round_trip_through_transformers_config():
    from transformers import FalconConfig as HFConfig

    ours = FalconConfig(
        hidden_size=4096,
        num_attention_heads=32,
        num_kv_heads=8,
        new_decoder_architecture=True,
        num_ln_in_parallel_attn=1,
        tie_word_embeddings=False,
        rope_theta=500042.0,
        ffn_hidden_size=16384,
        num_hidden_layers=60,
    )
    hf = HFConfig(**{k: v for k, v in ours.to_dict().items() if k != "model_type"})
    back = FalconConfig.from_dict(hf.to_dict())
    assert back.num_parameters() == ours.num_parameters()
    assert (back.rope_theta, back.tie_word_embeddings, back.num_ln_in_parallel_attn) == (500042.0, False, 1)


EXPECTED_PARAMS = {"falcon-7b": 6.92e9, "falcon-40b": 41.3e9, "falcon-180B": 178.6e9}
EXPECTED_KV_BYTES = {"falcon-7b": 8 * 1024, "falcon-40b": 120 * 1024, "falcon-180B": 160 * 1024}


def test_every_shared_config_builds_with_the_right_size(shared_data, tmp_path, capsys):
    files = sorted((shared_data / "falcon-configs").glob("*config*.json"))
    files = [f for f in files if "generation_config" not in f.name]
    assert files
    for file in files:
        name = file.name.split(".config")[0]
        config = FalconConfig.from_pretrained(file)
        with torch.device("meta"):
            model = FalconForCausalLM(config)
        counted = model.num_parameters()
        assert counted == config.num_parameters(), file.name
        assert counted == pytest.approx(EXPECTED_PARAMS[name], rel=0.002), file.name
        # falconlm info reports the KV bytes per token of the KV groups only.
        folder = tmp_path / file.name
        folder.mkdir()
        (folder / "config.json").write_text(file.read_text())
        assert cli_main(["info", "--model", str(folder), "--json", "--dtype", "bfloat16"]) == 0
        facts = json.loads(capsys.readouterr().out)
        assert facts["kv_cache_bytes_per_token"] == EXPECTED_KV_BYTES[name], file.name
        assert facts["kv_groups"] == config.num_kv_groups


def test_legacy_and_native_shared_configs_agree(shared_data):
    folder = shared_data / "falcon-configs"
    for name in ("falcon-7b", "falcon-40b"):
        legacy = FalconConfig.from_pretrained(folder / f"{name}.config.RW-original.json")
        native = FalconConfig.from_pretrained(folder / f"{name}.config.transformers-4.35.2.json")
        keep = (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "new_decoder_architecture",
            "parallel_attn",
            "bias",
            "alibi",
            "layer_norms",
            "num_kv_groups",
            "qkv_out_features",
        )
        assert {k: getattr(legacy, k) for k in keep} == {k: getattr(native, k) for k in keep}, name
