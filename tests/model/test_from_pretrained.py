"""FalconForCausalLM.from_pretrained loads every kind of folder: plain, ``falconlm quantize``d, hub GPTQ."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from falconlm.model import formats
from falconlm.model.checkpoint import CheckpointError, load_model
from falconlm.model.falcon import FalconForCausalLM
from falconlm.quant import QuantRecipe, load_checkpoint, load_quantized, quantize_checkpoint

from ..quant.test_gptq_checkpoint import write_gptq_checkpoint

IDS = torch.tensor([[5, 17, 200, 3, 99, 42, 7], [1, 2, 3, 4, 5, 6, 8]])
REPO_ROOT = Path(__file__).resolve().parents[2]


def _logits(model: FalconForCausalLM) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def test_plain_folder_equals_the_checkpoint_loader(tiny_checkpoint: Path) -> None:
    got = FalconForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    assert torch.equal(_logits(got), _logits(load_model(tiny_checkpoint, dtype=torch.bfloat16)))
    assert got.transformer.ln_f.weight.dtype is torch.bfloat16 and not got.training


def test_falconlm_quantized_folder_equals_the_quant_loader(tiny_checkpoint: Path, tmp_path: Path) -> None:
    quantize_checkpoint(tiny_checkpoint, tmp_path / "q", QuantRecipe.parse("int4"))
    got = FalconForCausalLM.from_pretrained(tmp_path / "q")
    assert type(got.transformer.h[0].mlp.dense_h_to_4h).__name__ == "QuantizedLinear"
    assert torch.equal(_logits(got), _logits(load_quantized(tmp_path / "q")))
    assert torch.equal(_logits(got), _logits(load_checkpoint(tmp_path / "q")))  # the alias agrees


def test_gptq_folder_equals_the_quant_loader(tmp_path: Path) -> None:
    from ..conftest import make_hf_checkpoint

    src = make_hf_checkpoint(tmp_path / "src", "7b")
    write_gptq_checkpoint(src, tmp_path / "gptq")
    got = FalconForCausalLM.from_pretrained(tmp_path / "gptq")
    assert got.config.extra["quantization_config"]["method"] == "gptq"
    assert torch.equal(_logits(got), _logits(load_quantized(tmp_path / "gptq")))


def test_quantize_on_load_equals_the_quant_loader(tiny_checkpoint: Path) -> None:
    got = FalconForCausalLM.from_pretrained(tiny_checkpoint, quantize="int8")
    assert got.config.extra["quantization_config"]["bits"] == 8
    assert torch.equal(_logits(got), _logits(load_quantized(tiny_checkpoint, quantize="int8")))


def test_a_registered_format_is_used_for_its_method(tiny_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "custom"
    folder.mkdir()
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "mine"}}))
    calls = []

    def load(path: Path, dtype: torch.dtype, device: str | torch.device, quantize: object) -> FalconForCausalLM:
        calls.append((path, dtype, device, quantize))
        return load_model(tiny_checkpoint, dtype=dtype, device=device)

    monkeypatch.setitem(formats._LOADERS, "mine", load)
    model = FalconForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert calls == [(folder, torch.bfloat16, "cpu", None)]
    assert model.transformer.ln_f.weight.dtype is torch.bfloat16


def test_an_unknown_method_is_a_clear_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "awq"
    folder.mkdir()
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "awq"}}))
    with pytest.raises(CheckpointError, match=r"quantization method 'awq' is not supported \(falconlm reads .*'gptq'"):
        FalconForCausalLM.from_pretrained(folder)


def test_the_model_imports_quant_only_when_a_quantized_folder_is_met(tiny_checkpoint: Path, tmp_path: Path) -> None:
    quantize_checkpoint(tiny_checkpoint, tmp_path / "q", QuantRecipe.parse("int8"))
    script = textwrap.dedent(f"""
        import sys
        from falconlm.model.falcon import FalconForCausalLM
        FalconForCausalLM.from_pretrained({str(tiny_checkpoint)!r})
        assert "falconlm.quant" not in sys.modules, "a plain folder imported falconlm.quant"
        model = FalconForCausalLM.from_pretrained({str(tmp_path / "q")!r})
        assert "falconlm.quant" in sys.modules
        print(type(model.lm_head).__name__)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "QuantizedLinear"
