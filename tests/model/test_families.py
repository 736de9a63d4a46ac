"""Family detection: ``model_type`` / ``architectures`` of a config.json pick the config and model classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from falconlm.model.config import FalconConfig
from falconlm.model.families import FAMILIES, MODEL_TYPES, detect, family_named, family_of, load_config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "configs"

# A fixture's file name starts with its model's name; the family it must be detected as follows from that.
FIXTURE_FAMILIES = {"falcon3-": "falcon3", "falcon-mamba": "mamba", "falcon3-mamba": "mamba", "falcon-h1": "h1"}


def _expected_family(file: Path) -> str:
    prefixes = [prefix for prefix in FIXTURE_FAMILIES if file.name.lower().startswith(prefix)]
    assert prefixes, f"{file.name}: add its family to FIXTURE_FAMILIES"
    return FIXTURE_FAMILIES[max(prefixes, key=len)]  # falcon3-mamba-... is Mamba, not Falcon3


CONFIG_FIXTURES = sorted(FIXTURES.glob("*.config.json"))


def test_there_are_published_falcon3_fixtures():
    assert {f.name for f in CONFIG_FIXTURES} >= {"falcon3-1b-instruct.config.json", "falcon3-7b-base.config.json"}


@pytest.mark.parametrize("file", CONFIG_FIXTURES, ids=lambda f: f.name)
def test_each_published_config_is_detected_as_its_family(file):
    raw = json.loads(file.read_text())
    family = _expected_family(file)
    assert detect(raw) == family
    # With model_type gone, architectures alone names the same family.
    assert detect({k: v for k, v in raw.items() if k != "model_type"}) == family
    if family in FAMILIES:  # a family with classes in this build loads into its config class
        assert isinstance(load_config(file), FAMILIES[family].config_class)


@pytest.mark.parametrize(
    ("raw", "family"),
    [
        ({"model_type": "falcon"}, "falcon"),
        ({"model_type": "RefinedWeb"}, "falcon"),
        ({"model_type": "RefinedWebModel"}, "falcon"),
        ({"architectures": ["RWForCausalLM"]}, "falcon"),
        ({}, "falcon"),  # TII's first configs named neither
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "falcon3"),
        ({"model_type": "falcon_mamba", "architectures": ["FalconMambaForCausalLM"]}, "mamba"),
        ({"architectures": ["FalconMambaForCausalLM"]}, "mamba"),
        ({"model_type": "falcon_h1", "architectures": ["FalconH1ForCausalLM"]}, "h1"),
        ({"architectures": ["FalconH1ForCausalLM"]}, "h1"),
    ],
)
def test_detect(raw, family):
    assert detect(raw) == family


def test_shared_falcon_configs_are_falcon(shared_data):
    files = sorted((shared_data / "falcon-configs").glob("*.config*.json"))
    assert files
    for file in files:
        assert detect(json.loads(file.read_text())) == "falcon", file.name
        assert isinstance(load_config(file), FalconConfig)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not a Falcon-family model"),
        ({"model_type": ["llama"]}, r"model_type \['llama'\] is not a Falcon-family model"),
        ({"architectures": ["GPT2LMHeadModel"]}, "architectures .* name no Falcon-family model"),
        ({"architectures": "LlamaForCausalLM"}, "architectures must be a list"),
    ],
)
def test_unknown_models_are_one_clear_error(raw, message):
    with pytest.raises(ValueError, match=message):
        detect(raw)


def test_unknown_model_type_fails_loading_with_the_same_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ValueError, match="model_type 'mistral' is not a Falcon-family model"):
        load_config(tmp_path)


def test_every_detected_family_is_runnable_or_refused_by_name():
    for name in set(MODEL_TYPES.values()):
        if name in FAMILIES:
            assert family_named(name).name == name
        else:
            with pytest.raises(ValueError, match=f"{name} checkpoints are recognised but not supported"):
                family_named(name)


def test_family_of_a_config():
    from falconlm.model.falcon3_config import Falcon3Config

    assert family_of(FalconConfig()).name == "falcon"
    assert family_of(Falcon3Config()).name == "falcon3"
