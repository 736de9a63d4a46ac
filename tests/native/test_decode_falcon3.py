"""The fused decode step over Falcon3's block (the Llama layout: RMSNorm, attention, then a SwiGLU MLP, each added
to the residual) against the torch path it replaces, for int8 / int4 and bfloat16 weights, in every native variant
this CPU runs. The comparisons are those of ``test_decode.py`` for Falcon's block."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from falconlm import FalconForCausalLM
from falconlm.engine.engine import Engine, EngineConfig
from falconlm.engine.fused_decode import fused_decoder, unsupported
from falconlm.engine.sampling_params import SamplingParams
from falconlm.model.falcon3 import Falcon3ForCausalLM
from falconlm.quant import load_quantized
from falconlm.tokenizer import Tokenizer

from ..conftest import needs_native, torch_threads
from ..model.falcon3_checkpoint import make_falcon3_checkpoint
from .fused_calls import counting
from .test_decode import _agree_in_float32, _rel, _side_by_side, _teacher_forced, long_row_agrees

pytestmark = needs_native

# head_dim 32 (the kernel's blocks); "gqa": two query heads per KV head and an untied head, as Falcon3 has;
# "wide": 18 query heads on one KV head, more than the 16 the attention kernel takes at a time.
SHAPES = {
    "gqa": ("gqa", {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}),
    "wide": ("tied", {"num_attention_heads": 18, "num_key_value_heads": 1, "head_dim": 32}),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def checkpoint(request, tmp_path_factory) -> Path:
    variant, overrides = SHAPES[request.param]
    return make_falcon3_checkpoint(tmp_path_factory.mktemp(f"fused3-{request.param}"), variant, **overrides)


@pytest.mark.parametrize("spec", ["int8", "int4", "int4-g32-sym"])
def test_fused_falcon3_steps_equal_the_torch_path_in_float32(isa: str, checkpoint: Path, spec: str) -> None:
    model = load_quantized(checkpoint, quantize=spec, dtype=torch.float32)
    assert isinstance(model, Falcon3ForCausalLM) and unsupported(model.decoder) is None
    calls = counting(model)
    fused, torch_logits, fused_kv, torch_kv = _side_by_side(model)
    assert calls == [2] * 12  # every decode step, both rows in one call
    _agree_in_float32(fused, torch_logits)
    _agree_in_float32(fused_kv, torch_kv)


def test_bf16_falcon3_weights_run_fused_close_to_the_torch_path(isa: str, checkpoint: Path) -> None:
    model = FalconForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    calls = counting(model)
    fused, fused_cache = _teacher_forced(model, True, torch.bfloat16)
    plain, plain_cache = _teacher_forced(model, False, torch.bfloat16)
    assert calls == [2] * 12
    assert _rel(fused, plain) < 0.03 and _rel(fused_cache.k, plain_cache.k) < 0.03


@pytest.mark.parametrize("rope", ["linear-rope", "dynamic-rope"])
def test_fused_falcon3_steps_take_the_scaled_rotary_of_the_torch_path(isa: str, tmp_path: Path, rope: str) -> None:
    # max_position_embeddings 16: the 17 positions of these steps pass it, where dynamic scaling starts to stretch.
    checkpoint = make_falcon3_checkpoint(tmp_path / rope, rope, num_attention_heads=4, head_dim=32)
    model = load_quantized(checkpoint, quantize="int8", dtype=torch.float32)
    assert model.config.rope_scaling is not None and unsupported(model.decoder) is None
    fused, torch_logits, fused_kv, torch_kv = _side_by_side(model)
    _agree_in_float32(fused, torch_logits)
    _agree_in_float32(fused_kv, torch_kv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_long_falcon3_row_split_between_threads_equals_the_torch_path(
    isa: str, tmp_path: Path, dtype: torch.dtype
) -> None:
    variant, overrides = SHAPES["gqa"]
    checkpoint = make_falcon3_checkpoint(tmp_path / "f3", variant, max_position_embeddings=1024, **overrides)
    long_row_agrees(load_quantized(checkpoint, quantize="int4", dtype=dtype), dtype)


@pytest.mark.parametrize("spec", ["bfloat16", "int4"])
def test_a_fused_falcon3_step_gives_the_same_bits_on_any_number_of_threads(
    isa: str, checkpoint: Path, spec: str
) -> None:
    def logits(threads: int) -> torch.Tensor:
        if spec == "bfloat16":
            model = FalconForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
        else:
            model = load_quantized(checkpoint, quantize=spec, dtype=torch.bfloat16)
        with torch_threads(threads):
            return _teacher_forced(model, True, torch.bfloat16, steps=4, rows=3)[0]

    one = logits(1)
    assert torch.equal(one, logits(2)) and torch.equal(one, logits(3))


def test_paged_falcon3_engine_steps_run_fused_alone_or_batched(isa: str, checkpoint: Path, monkeypatch) -> None:
    model = load_quantized(checkpoint, quantize="int4", dtype=torch.float32)
    tok = Tokenizer.from_pretrained(checkpoint)
    prompts = [[5, 9, 77], list(range(10, 19)), list(range(40, 54))]  # lengths 3, 9, 14 over blocks of 4
    params = [SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)] * 3
    config = EngineConfig(block_size=4, max_num_batched_tokens=64, enable_prefix_caching=False)
    calls = counting(model)
    fused = [o.token_ids for o in Engine(model, tok, config).generate(prompts, params)]
    assert 3 in calls  # decode steps of all three rows together, through their block tables
    alone = [Engine(model, tok, config).generate([p], params[:1])[0].token_ids for p in prompts]
    assert alone == fused  # each row's tokens whatever else is in the batch
    monkeypatch.setenv("FALCONLM_FUSED_DECODE", "0")
    plain = [o.token_ids for o in Engine(model, tok, config).generate(prompts, params)]
    assert fused == plain


@pytest.mark.parametrize(
    ("overrides", "why"),
    [({"attention_bias": True}, "bias-free"), ({"mlp_bias": True}, "bias-free")],
)
def test_falcon3_layers_the_kernel_does_not_take_keep_the_torch_path(tmp_path: Path, overrides: dict, why: str):
    variant, shape = SHAPES["gqa"]
    model = FalconForCausalLM.from_pretrained(make_falcon3_checkpoint(tmp_path, variant, **shape, **overrides))
    assert why in unsupported(model.decoder) and fused_decoder(model.decoder) is None
