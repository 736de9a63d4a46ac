"""The published tiiuae/falcon-mamba-7b config.json (a fixture, see tests/fixtures/configs/SOURCE-falcon-mamba.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from falconlm.cli.info import describe
from falconlm.model.mamba_config import FalconMambaConfig, is_mamba_config

FIXTURE = Path(__file__).parents[1] / "fixtures" / "configs" / "falcon-mamba-7b.config.json"


def test_published_config_reads_with_its_shapes():
    raw = json.loads(FIXTURE.read_text())
    assert is_mamba_config(raw)
    config = FalconMambaConfig.from_dict(raw)
    assert config.mixer_rms and config.family == "falcon-mamba"
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (4096, 8192, 64)
    assert (config.state_size, config.conv_kernel, config.time_step_rank) == (16, 4, 256)
    assert config.tie_word_embeddings is False and config.eos_token_id == 11
    # conv state bf16 [8192, 3] + SSM state fp32 [8192, 16], 64 layers
    assert config.state_bytes_per_sequence(2, 4) == 64 * 8192 * (3 * 2 + 16 * 4)


def test_parameter_count_equals_transformers():
    import transformers

    raw = json.loads(FIXTURE.read_text())
    hf_config = transformers.FalconMambaConfig(**{k: v for k, v in raw.items() if not k.startswith("_")})
    with torch.device("meta"):
        hf = transformers.FalconMambaForCausalLM(hf_config)
    assert FalconMambaConfig.from_dict(raw).num_parameters() == hf.num_parameters() == 7_272_665_088


def test_architectures_alone_decide_the_variant():
    assert FalconMambaConfig.from_dict({"architectures": ["MambaForCausalLM"]}).mixer_rms is False
    assert FalconMambaConfig.from_dict({"architectures": ["FalconMambaForCausalLM"]}).mixer_rms is True
    assert not is_mamba_config({"model_type": "falcon", "architectures": ["FalconMambaForCausalLM"]})
    with pytest.raises(ValueError, match="hidden_act"):
        FalconMambaConfig(hidden_act="gelu")


def test_info_reports_family_state_bytes_and_torch_path(tmp_path):
    shutil.copy(FIXTURE, tmp_path / "config.json")
    facts = describe(tmp_path)
    assert facts["family"] == "Falcon-Mamba (Mamba-1)"
    assert facts["parameters"] == 7_272_665_088
    assert facts["kv_cache_bytes_per_token"] == 0
    assert facts["ssm_state_bytes_per_sequence"] == 64 * 8192 * 70
    assert facts["fused_decode_step"].startswith("no (") and "torch path" in facts["fused_decode_step"]
