"""GPTQ: error-compensating int4 rounding stays in the stored format and beats round-to-nearest on its layer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from falconlm.cli import main
from falconlm.model.falcon import FalconForCausalLM
from falconlm.quant import QuantRecipe, load_quantized, quantize_checkpoint
from falconlm.quant.gptq import calibration_ids, gptq_quantize
from falconlm.quant.primitives import plan_groups, quantize_int4, unpack_int4


def _correlated_inputs(samples: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) * 0.1 + torch.eye(k)
    return torch.randn(samples, k, generator=gen) @ mix


@pytest.mark.parametrize(
    ("n", "k", "group", "symmetric"),
    [(64, 256, 64, False), (96, 512, 128, True), (48, 192, 32, False), (32, 100, 64, False)],
)
def test_gptq_lowers_the_layer_output_error_against_round_to_nearest(n, k, group, symmetric) -> None:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n)) * 0.05
    x = _correlated_inputs(2048, k, seed=k)
    x[:, 3] = 0  # an input that never fires: its column is free
    plan = plan_groups(k, group)
    gptq = gptq_quantize(w, 2 * x.T @ x / x.shape[0], plan, symmetric)
    rtn = quantize_int4(w, plan, symmetric)
    for field in ("qweight", "scales", "zeros"):  # the stored format, field for field
        a, b = getattr(gptq, field), getattr(rtn, field)
        assert (a is None) == (b is None) and (a is None or (a.shape == b.shape and a.dtype == b.dtype))
    assert int(unpack_int4(gptq.qweight).max()) <= 15
    ref = x @ w.T
    error = {
        name: float((x @ q.dequantize().T - ref).norm() / ref.norm()) for name, q in [("gptq", gptq), ("rtn", rtn)]
    }
    assert error["gptq"] < 0.85 * error["rtn"], error


def test_gptq_with_identity_hessian_stays_close_to_rounding() -> None:
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    plan = plan_groups(128, 64)
    gptq = gptq_quantize(w, torch.eye(128), plan).dequantize()
    rtn = quantize_int4(w, plan).dequantize()
    # Uncorrelated inputs leave little to compensate: both land within one grid step of the weights.
    step = (w.view(32, 2, 64).amax(-1) - w.view(32, 2, 64).amin(-1)).max() / 15
    assert (gptq - w).abs().max() <= step and (rtn - w).abs().max() <= step / 2 + 1e-6


def test_calibration_windows_are_seeded_and_checked() -> None:
    tokens = torch.arange(1000)
    a, b = calibration_ids(tokens, 4, 16, seed=3), calibration_ids(tokens, 4, 16, seed=3)
    assert a.shape == (4, 16) and torch.equal(a, b)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 15, dtype=torch.long))  # contiguous windows
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_ids(tokens[:10], 2, 16)


def test_gptq_checkpoint_loads_and_records_its_method(tiny_checkpoint: Path, tmp_path: Path) -> None:
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    calibration = torch.randint(0, config["vocab_size"], (8, 32), generator=torch.Generator().manual_seed(0))
    recipe = QuantRecipe(bits=4, group_size=32, method="gptq")
    quantize_checkpoint(tiny_checkpoint, tmp_path / "q", recipe, progress=False, calibration=calibration)
    block = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert block["method"] == "gptq" and block["bits"] == 4
    model = load_quantized(tmp_path / "q")
    ids = torch.tensor([[5, 17, 200, 3, 99, 42, 7]])
    with torch.no_grad():
        logits, ref = model(ids), FalconForCausalLM.from_pretrained(tiny_checkpoint)(ids)
    assert float((logits - ref).norm() / ref.norm()) < 0.3  # the int4 bound of test_convert
    with pytest.raises(ValueError, match="GPTQ needs calibration text"):
        quantize_checkpoint(tiny_checkpoint, tmp_path / "r", recipe, progress=False)
    with pytest.raises(ValueError, match="GPTQ rounds int4 matrices"):
        QuantRecipe(bits=8, method="gptq")


def test_quantize_command_runs_gptq_on_a_text_file(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    text = tmp_path / "calib.txt"
    text.write_text("Once upon a time there was a little robot who liked to count the stars. " * 40)
    base = ["quantize", "-m", str(tiny_checkpoint), "--bits", "4", "--method", "gptq"]
    argv = [*base, "-o", str(tmp_path / "q"), "--calibration", str(text), "--calibration-samples", "4"]
    assert main([*argv, "--calibration-length", "16"]) == 0
    assert "int4-g64-gptq" in capsys.readouterr().out
    assert main([*base, "-o", str(tmp_path / "r")]) == 2
    assert "--method gptq needs --calibration FILE" in capsys.readouterr().err
    assert main([*base, "-o", str(tmp_path / "s"), "--calibration", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
