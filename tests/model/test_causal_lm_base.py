"""The shared causal-LM base: every family saves, reloads, refuses another family's folder, ties or unties its head
and initialises the same way, with its own module names kept."""

from __future__ import annotations

import pytest
import torch

from falconlm.model.causal_lm import CausalLM
from falconlm.model.config import preset
from falconlm.model.falcon import FalconForCausalLM
from falconlm.model.falcon3 import Falcon3ForCausalLM
from falconlm.model.falcon3_config import Falcon3Config
from falconlm.model.falcon_h1 import FalconH1ForCausalLM
from falconlm.model.falcon_mamba import FalconMambaForCausalLM, MambaStates
from falconlm.model.h1_config import FalconH1Config
from falconlm.model.mamba_config import FalconMambaConfig
from falconlm.model.norms import RMSNorm


def tiny(family: str, tied: bool = False) -> CausalLM:
    if family == "falcon":
        config = preset("bench-194m", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=64)
        config.tie_word_embeddings = tied
        return FalconForCausalLM(config)
    if family == "falcon3":
        config = Falcon3Config(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, tie_word_embeddings=tied,
        )  # fmt: skip
        return Falcon3ForCausalLM(config)
    if family == "mamba":
        config = FalconMambaConfig(
            vocab_size=64, hidden_size=32, state_size=4, num_hidden_layers=2, tie_word_embeddings=tied
        )
        return FalconMambaForCausalLM(config)
    config = FalconH1Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_state=8, mamba_chunk_size=4,
        tie_word_embeddings=tied, lm_head_multiplier=0.5,
    )  # fmt: skip
    return FalconH1ForCausalLM(config)


FAMILIES = ["falcon", "falcon3", "mamba", "h1"]
NORM_NAMES = {
    "falcon": "transformer.ln_f",
    "falcon3": "model.norm",
    "mamba": "backbone.norm_f",
    "h1": "model.final_layernorm",
}


def logits(model: CausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_gives_the_same_logits(family: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = tiny(family).eval()
    model.init_weights(seed=1)
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path)
    assert type(again) is type(model)
    ids = torch.randint(0, 64, (2, 5))
    torch.testing.assert_close(logits(again, ids), logits(model, ids), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["falcon3", "mamba", "h1"])
def test_from_pretrained_refuses_another_family(family: str, tmp_path) -> None:
    other = "h1" if family != "h1" else "falcon3"
    tiny(other).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"checkpoint, not a {type(tiny(family)).family_label} one"):
        type(tiny(family)).from_pretrained(tmp_path)


def test_falcon_from_pretrained_returns_whatever_family_the_folder_holds(tmp_path) -> None:
    for family in ("falcon3", "mamba", "h1"):
        tiny(family).save_pretrained(tmp_path / family)
        assert type(FalconForCausalLM.from_pretrained(tmp_path / family)) is type(tiny(family))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_names_head_tying_and_counts(family: str, tied: bool) -> None:
    model = tiny(family, tied)
    assert model.final_norm is model.get_submodule(NORM_NAMES[family])
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    assert model.num_parameters() == model.config.num_parameters()
    assert model.dtype == torch.float32 and model.device.type == "cpu"


@pytest.mark.parametrize("family", FAMILIES)
def test_init_weights_is_seeded_and_sets_norms_to_identity(family: str) -> None:
    a, b = tiny(family), tiny(family)
    a.init_weights(seed=3)
    b.init_weights(seed=3)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    norms = [m for m in a.modules() if isinstance(m, (RMSNorm, torch.nn.LayerNorm))]
    assert norms and all(bool((m.weight == 1).all()) for m in norms)


def test_compute_logits_rows_and_h1_multiplier() -> None:
    model = tiny("h1").eval()
    hidden = torch.randn(2, 3, 32)
    rows = torch.tensor([2, 5])
    with torch.no_grad():
        picked = model.compute_logits(hidden, rows)
        torch.testing.assert_close(picked, model.lm_head(hidden.reshape(6, 32)[rows]) * 0.5)


def test_mamba_states_are_recurrent_states_with_reset() -> None:
    model = tiny("mamba")
    states = model.new_states(3)
    states.conv.fill_(1.0)
    states.ssm.fill_(1.0)
    states.reset(torch.tensor([1]))
    assert isinstance(states, MambaStates) and states.num_slots == 3
    assert float(states.conv[:, 1].abs().sum()) == 0 and float(states.ssm[:, 0].sum()) > 0
    assert states.bytes_per_slot() == states.conv[:, 0].nbytes + states.ssm[:, 0].nbytes
