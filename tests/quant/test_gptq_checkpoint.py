"""Hub GPTQ checkpoints (AutoGPTQ's packed layout), written here from known codes, load to the weights they mean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from falconlm.model.falcon import FalconForCausalLM
from falconlm.quant import is_quantized, load_checkpoint, quantize_checkpoint
from falconlm.quant.convert import BODY_KINDS, QuantRecipe

from ..conftest import make_hf_checkpoint

GROUP = 32


def _pack_words(values: torch.Tensor, dim: int) -> torch.Tensor:
    """uint8 values 0..15 -> int32 words of eight along ``dim``, lowest bits first (AutoGPTQ's packing)."""
    v = values.to(torch.int64).movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], -1, 8)
    words = (v << (4 * torch.arange(8))).sum(-1)  # up to 2**32 - 1
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


def write_gptq_checkpoint(src: Path, out: Path, fmt: str = "gptq", desc_act: bool = False) -> dict[str, torch.Tensor]:
    """A GPTQ copy of checkpoint ``src``: every block matrix gets integer zero points, float16 scales and codes
    rounded from its weights. Returns the dequantized [N, K] weight each module stands for."""
    out.mkdir()
    tensors = load_file(src / "model.safetensors")
    expected = {}
    gen = torch.Generator().manual_seed(0)
    for name in [n for n in tensors if n.endswith(".weight") and any(k in n for k in BODY_KINDS)]:
        module = name.removesuffix(".weight")
        w = tensors.pop(name).float()  # [N, K]
        n, k = w.shape
        groups = k // GROUP
        scales = (w.view(n, groups, GROUP).abs().amax(-1) / 7.5).clamp_min(1e-4).half()  # [N, G]
        zero = torch.randint(5, 11, (n, groups), generator=gen)  # integer zero points, as GPTQ stores them
        s = scales.float().repeat_interleave(GROUP, dim=1)
        codes = ((w / s).round() + zero.repeat_interleave(GROUP, dim=1)).clamp(0, 15).to(torch.uint8)
        expected[module] = s * (codes.float() - zero.repeat_interleave(GROUP, dim=1))
        stored_zero = zero - (1 if fmt == "gptq" else 0)
        tensors[f"{module}.qweight"] = _pack_words(codes.T.contiguous(), dim=0)  # [K / 8, N]
        tensors[f"{module}.qzeros"] = _pack_words(stored_zero.T.contiguous().to(torch.uint8), dim=1)  # [G, N / 8]
        tensors[f"{module}.scales"] = scales.T.contiguous()  # [G, N]
        tensors[f"{module}.g_idx"] = (torch.arange(k) // GROUP).to(torch.int32)
    save_file(tensors, out / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": desc_act, "sym": False,
        "checkpoint_format": fmt,
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    return expected


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_checkpoint_loads_to_the_weights_it_stores(tmp_path: Path, fmt: str) -> None:
    src = make_hf_checkpoint(tmp_path / "src", "7b", hidden_size=64, num_attention_heads=4)
    expected = write_gptq_checkpoint(src, tmp_path / "gptq", fmt)
    assert is_quantized(tmp_path / "gptq")
    exact = load_checkpoint(tmp_path / "gptq", kernel="reference")  # the stored format, float32 scales
    for module, weight in expected.items():
        torch.testing.assert_close(exact.get_submodule(module).weight, weight, rtol=1e-6, atol=1e-7)
    model = load_checkpoint(tmp_path / "gptq")  # the fastest kernel, as front ends load it
    # The same weights in a plain model give the same logits.
    plain = FalconForCausalLM.from_pretrained(src)
    for module, weight in expected.items():
        plain.get_submodule(module).weight.data.copy_(weight)
    ids = torch.tensor([[5, 17, 200, 3, 99, 42, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), plain(ids), rtol=2e-2, atol=2e-2)  # int8 activations (native kernel)
    assert model.lm_head.__class__.__name__ == "FalconLinear"  # the head stays as stored


def test_gptq_checkpoints_falconlm_cannot_run_exactly_are_refused(tmp_path: Path) -> None:
    src = make_hf_checkpoint(tmp_path / "src", "7b", hidden_size=64, num_attention_heads=4)
    write_gptq_checkpoint(src, tmp_path / "act", desc_act=True)
    with pytest.raises(ValueError, match="act-order GPTQ checkpoints"):
        load_checkpoint(tmp_path / "act")
    write_gptq_checkpoint(src, tmp_path / "g", fmt="marlin")
    with pytest.raises(ValueError, match="checkpoint_format 'marlin' is not supported"):
        load_checkpoint(tmp_path / "g")
    with pytest.raises(ValueError, match="already quantized"):
        load_checkpoint(tmp_path / "act", quantize="int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint(tmp_path / "act", tmp_path / "again", QuantRecipe())
