"""The fused decode step (falconlm/engine/fused_decode.py over the native ``falcon_decode_layers``) against the
torch path it replaces, for int8 / int4 and bfloat16 weights, in every native variant this CPU runs.

In float32 the two differ only by rounding (LayerNorm, GELU and attention sums in another order), so logits and
the K/V written to the cache must agree to about 1e-7 relative; any mistake (a wrong rotation, cache slot, group
or LayerNorm) shows as an error of order one. The tiny checkpoints here have head_dim 32 so that the kernel's
blocks fit (the shared tiny ones have 16, which it declines).
"""

from __future__ import annotations

import copy
import ctypes
import gc
import itertools
import weakref
from pathlib import Path

import pytest
import torch

from falconlm.engine.engine import Engine, EngineConfig
from falconlm.engine.fused_decode import dense_step, fused_decoder, unsupported
from falconlm.engine.kernels import bind_weight_kernels
from falconlm.engine.sampling_params import SamplingParams
from falconlm.model.attention import DecodeRows
from falconlm.model.dense import KVCache, build_dense_attention
from falconlm.model.falcon import FalconForCausalLM
from falconlm.model.positions import rope_cos_sin
from falconlm.native.decode import check_layout, python_layout
from falconlm.quant import load_quantized, quantize_model
from falconlm.quant.convert import QuantRecipe

from ..conftest import make_hf_checkpoint, needs_native, torch_threads
from .fused_calls import counting

pytestmark = needs_native

# head_dim 32 in every variant; 11b also has an ffn width that is not 4 x hidden; 7b-wide has 18 query heads on
# its one KV group, more than the 16 the attention kernel takes at a time (Falcon-7B has 71); rw is falcon-rw's
# sequential block, with biases and ALiBi, and a KV group per head.
SHAPES = {
    "7b": {"hidden_size": 128},
    "40b": {"hidden_size": 256},
    "11b": {"hidden_size": 256, "ffn_hidden_size": 384},
    "7b-wide": {"hidden_size": 576, "num_attention_heads": 18},
    "rw": {"hidden_size": 192, "num_attention_heads": 6},
}
# In float32 almost every step agrees to about 1e-7. Now and then an activation lands so close to an int8 rounding
# boundary that the two paths round it apart, which moves that step's logits by about 1e-3: hence a median and a
# looser maximum. Which activations land there depends on the machine's torch kernels (with oneDNN capped at AVX2,
# an early step of int8 7b did), so the float32 comparisons run each step from the same cache (_side_by_side):
# one such step then stays one step, where through the K/V it left it would move all the row's later steps.
TYPICAL = 1e-5
WORST = 2e-2


@pytest.fixture(scope="module", params=sorted(SHAPES))
def checkpoint(request, tmp_path_factory) -> Path:
    name = request.param
    return make_hf_checkpoint(tmp_path_factory.mktemp(f"fused-{name}"), name.split("-")[0], **SHAPES[name])


def _teacher_forced(
    model: FalconForCausalLM, fused: bool, dtype: torch.dtype, steps: int = 12, rows: int = 2, prompt_len: int = 5
):
    """Logits [steps, rows, vocab] of rows fed fixed tokens one at a time after a prompt (through the torch
    forward), each step fused or through torch, and the cache."""
    prompt, tokens, cache = _inputs(model, dtype, steps, rows, prompt_len)
    step = _fused_step if fused else _torch_step
    with torch.no_grad():
        model(prompt, kv_cache=cache)
        logits = [step(model, tokens[:, i : i + 1], cache).float() for i in range(steps)]
    return torch.stack(logits), cache


def _inputs(model: FalconForCausalLM, dtype: torch.dtype, steps: int, rows: int, prompt_len: int):
    """A fixed prompt [rows, prompt_len], the tokens fed after it [rows, steps], and an empty cache for both."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (rows, prompt_len), generator=gen)
    tokens = torch.randint(0, model.config.vocab_size, (rows, steps), generator=gen)
    return prompt, tokens, KVCache(model.config, rows, prompt_len + steps, dtype)


def _side_by_side(model: FalconForCausalLM, steps: int = 12, rows: int = 2, prompt_len: int = 5):
    """Float32 logits [steps, rows, vocab] of the fused step and of the torch path, and the K/V [steps, layers,
    rows, groups, 2, d] each writes, every step run both ways from the same cache (the torch path's), after a
    prompt through the torch forward."""
    prompt, tokens, cache = _inputs(model, torch.float32, steps, rows, prompt_len)
    out: dict[str, list[torch.Tensor]] = {"fused": [], "torch": [], "fused_kv": [], "torch_kv": []}
    with torch.no_grad():
        model(prompt, kv_cache=cache)
        for i in range(steps):
            ids, at = tokens[:, i : i + 1], cache.length
            fused_cache = copy.deepcopy(cache)
            out["fused"].append(_fused_step(model, ids, fused_cache))
            out["torch"].append(_torch_step(model, ids, cache))
            for name, c in (("fused_kv", fused_cache), ("torch_kv", cache)):
                out[name].append(torch.stack([c.k[:, :, :, at], c.v[:, :, :, at]], dim=-2))
    return tuple(torch.stack(v) for v in out.values())


def _torch_step(model: FalconForCausalLM, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    return model(ids, kv_cache=cache)[:, -1]


def _fused_step(model: FalconForCausalLM, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    logits = dense_step(model, ids, cache)
    assert logits is not None, unsupported(model.transformer)
    return logits


def _agree_in_float32(a: torch.Tensor, b: torch.Tensor) -> None:
    """Vectors along the last dimension of ``a`` and ``b`` (logits, or K/V per position) agree as float32 should."""
    a, b = a.float().flatten(0, -2), b.float().flatten(0, -2)
    filled = b.norm(dim=-1) > 0  # cache positions never written are zero in both
    assert torch.equal(filled, a.norm(dim=-1) > 0)
    per = (a - b)[filled].norm(dim=-1) / b[filled].norm(dim=-1)
    assert per.median() < TYPICAL and per.max() < WORST, f"median {per.median():.2e}, max {per.max():.2e}"


def _first_layernorm(model: FalconForCausalLM) -> torch.nn.LayerNorm:
    """The first block's attention LayerNorm (Falcon-40B / 180B / 11B) or its only one (Falcon-7B)."""
    block = model.transformer.h[0]
    return block.ln_attn if hasattr(block, "ln_attn") else block.input_layernorm


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("spec", ["int8", "int4", "int4-g32-sym"])
def test_fused_steps_equal_the_torch_path_in_float32(isa: str, checkpoint: Path, spec: str) -> None:
    model = load_quantized(checkpoint, quantize=spec, dtype=torch.float32)
    calls = counting(model)
    fused, torch_logits, fused_kv, torch_kv = _side_by_side(model)
    assert calls == [2] * 12  # every decode step, both rows in one call; the prompt went through torch
    _agree_in_float32(fused, torch_logits)
    _agree_in_float32(fused_kv, torch_kv)
    fused_cache = _teacher_forced(model, True, torch.float32)[1]  # fused steps alone, one after the other
    assert fused_cache.length == 17 and (fused_cache.k[:, :, :, 5:].norm(dim=-1) > 0).all()


def long_row_agrees(model: FalconForCausalLM, dtype: torch.dtype) -> None:
    """One row and two threads, 4 steps after a 700-position prompt: each layer's attention is split in parts
    (PART_KEYS), and the fused steps' logits and K/V equal the torch path's (float32), or stay within 3% (bf16)."""
    with torch_threads(2):
        fused, fused_cache = _teacher_forced(model, True, dtype, steps=4, rows=1, prompt_len=700)
        torch_logits, torch_cache = _teacher_forced(model, False, dtype, steps=4, rows=1, prompt_len=700)
    if dtype is torch.float32:
        _agree_in_float32(fused, torch_logits)
        _agree_in_float32(fused_cache.k, torch_cache.k)
    else:
        assert _rel(fused, torch_logits) < 0.03 and _rel(fused_cache.k, torch_cache.k) < 0.03


@pytest.mark.parametrize("name", ["7b", "rw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_long_row_split_between_threads_equals_the_torch_path(
    isa: str, tmp_path: Path, dtype: torch.dtype, name: str
) -> None:
    # One row: each layer's attention over 700 positions is split in two parts (for rw, with ALiBi's bias).
    checkpoint = make_hf_checkpoint(tmp_path / name, name, max_position_embeddings=1024, **SHAPES[name])
    long_row_agrees(load_quantized(checkpoint, quantize="int4", dtype=dtype), dtype)


@pytest.mark.parametrize("spec", ["bfloat16", "int8", "int4"])
def test_a_fused_step_gives_the_same_bits_on_any_number_of_threads(isa: str, checkpoint: Path, spec: str) -> None:
    # The matmuls' weight rows go to the threads in shares (csrc/shares.h), attention in units taken as threads
    # come free: which thread computes what changes with the count, the order of every sum does not.
    if spec == "bfloat16":
        model = FalconForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    else:
        model = load_quantized(checkpoint, quantize=spec, dtype=torch.bfloat16)
    # The head as the engine binds it (the invariant native matmul): torch's bfloat16 GEMM sums by thread count
    # where oneDNN has no bfloat16 arithmetic, which is the head's business, not the fused step's.
    bind_weight_kernels(model)
    results = []
    for count in (1, 2, 3):
        with torch_threads(count):
            results.append(_teacher_forced(model, True, torch.bfloat16, steps=4, rows=3))
    (logits, cache), others = results[0], results[1:]
    assert _rel(logits, _teacher_forced(model, False, torch.bfloat16, steps=4, rows=3)[0]) < 0.03
    for other_logits, other_cache in others:
        assert torch.equal(other_logits, logits)
        assert torch.equal(other_cache.k, cache.k) and torch.equal(other_cache.v, cache.v)


def test_bf16_fused_steps_stay_as_close_to_float32_as_the_torch_path(checkpoint: Path) -> None:
    # The fused step keeps its residual stream in float32; the torch path rounds it to bfloat16 after every op.
    exact, _ = _teacher_forced(load_quantized(checkpoint, quantize="int8", dtype=torch.float32), True, torch.float32)
    model = load_quantized(checkpoint, quantize="int8", dtype=torch.bfloat16)
    fused, fused_cache = _teacher_forced(model, True, torch.bfloat16)
    torch_logits, torch_cache = _teacher_forced(model, False, torch.bfloat16)
    assert fused_cache.k.dtype is torch.bfloat16
    assert _rel(fused, exact) < 0.03
    assert _rel(fused, exact) <= 1.2 * _rel(torch_logits, exact)
    assert _rel(fused_cache.k, torch_cache.k) < 0.03


def test_bf16_weights_run_fused_and_closer_to_float32_than_the_torch_path(isa: str, checkpoint: Path) -> None:
    exact, _ = _teacher_forced(FalconForCausalLM.from_pretrained(checkpoint), False, torch.float32)
    model = FalconForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    calls = counting(model)
    fused, fused_cache = _teacher_forced(model, True, torch.bfloat16)
    assert calls == [2] * 12
    torch_logits, torch_cache = _teacher_forced(model, False, torch.bfloat16)
    assert _rel(fused, exact) < 0.03
    assert _rel(fused, exact) <= 1.2 * _rel(torch_logits, exact)
    assert _rel(fused_cache.k, torch_cache.k) < 0.03


def test_steps_that_need_gradients_are_declined(checkpoint: Path) -> None:
    model = FalconForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    cache = KVCache(model.config, 1, 8, torch.bfloat16)
    x = model.transformer.word_embeddings(torch.tensor([[4]])).requires_grad_()
    ctx = build_dense_attention(model.config, 1, None, cache, x.dtype, x.device, 1, 0.0)
    cos_sin = rope_cos_sin(model.config, torch.tensor([[0]]), x.dtype)
    with torch.enable_grad():
        assert fused_decoder(model.transformer)(x, *cos_sin, ctx.decode_rows()) is None
    model.train()
    assert fused_decoder(model.transformer) is None  # training steps never run fused


@pytest.mark.parametrize("scaling", [None, {"type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 2.0}])
def test_the_rotary_table_gives_the_torch_paths_bits_at_every_position(tmp_path: Path, scaling: dict | None) -> None:
    path = make_hf_checkpoint(tmp_path, "7b", hidden_size=128, max_position_embeddings=64, rope_scaling=scaling)
    model = FalconForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    decoder = fused_decoder(model.transformer)
    assert decoder is not None, unsupported(model.transformer)
    config = model.config
    d = config.head_dim
    # Rows one at a time past the first table's end (it grows three times, to 4096 x 32 values, which 3 threads
    # split at no multiple of the vector width), then batches of rows in any order.
    singles = [torch.tensor([[p]]) for p in [*range(0, 1300, 7), 511, 512, 1023, 1024, 1299, 2048, 3001]]
    batches = [torch.tensor([[5], [900], [17]]), torch.tensor([[3, 4, 5, 6]]), torch.arange(1300).view(13, 100)]
    for dtype, positions in itertools.product((torch.bfloat16, torch.float32), [*singles, *batches]):
        with torch_threads(3):
            lengths = torch.full_like(positions, 1300) if scaling and scaling["type"] == "dynamic" else None
            cos, sin = decoder.rotary(config, positions, dtype, lengths)
        want_cos, want_sin = rope_cos_sin(config, positions, dtype, lengths)
        assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (positions.numel(), d)
        assert torch.equal(cos, want_cos.reshape(-1, d).float()), (dtype, positions.reshape(-1)[:4])
        assert torch.equal(sin, want_sin.reshape(-1, d).float()), (dtype, positions.reshape(-1)[:4])


@pytest.mark.parametrize("name", ["7b", "rw"])
def test_paged_engine_steps_run_fused_and_give_the_same_tokens(
    isa: str, tmp_path: Path, monkeypatch, name: str
) -> None:
    checkpoint = make_hf_checkpoint(tmp_path / name, name, **SHAPES[name])
    model = load_quantized(checkpoint, quantize="int4", dtype=torch.float32)
    from falconlm.tokenizer import Tokenizer

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


def test_rebinds_when_the_weights_move(checkpoint: Path) -> None:
    model = load_quantized(checkpoint, quantize="int8", dtype=torch.float32)
    before, _ = _teacher_forced(model, True, torch.float32)
    ln = _first_layernorm(model)
    ln.weight = torch.nn.Parameter(ln.weight.detach() * 1.5, requires_grad=False)  # a new tensor elsewhere
    fused, _ = _teacher_forced(model, True, torch.float32)
    torch_logits, _ = _teacher_forced(model, False, torch.float32)
    assert _rel(fused, before) > 1e-2  # the change is seen...
    _agree_in_float32(fused, torch_logits)  # ...and computed as the torch path does


def test_the_engine_checks_the_weights_when_a_run_starts_and_sees_a_change_between_runs(
    checkpoint: Path, monkeypatch
) -> None:
    model = load_quantized(checkpoint, quantize="int8", dtype=torch.float32)
    from falconlm.engine import fused_decode
    from falconlm.tokenizer import Tokenizer

    checks = []
    current = fused_decode._Binding.current
    monkeypatch.setattr(fused_decode._Binding, "current", lambda self: checks.append(1) or current(self))
    engine = Engine(model, Tokenizer.from_pretrained(checkpoint), EngineConfig(enable_prefix_caching=False))
    params = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0)]
    calls = counting(model)
    before = engine.generate([[5, 9, 77]], params)[0]
    assert len(calls) == 7 and len(checks) == 1  # seven decode steps, one check: the run's first step
    ln = _first_layernorm(model)
    ln.weight = torch.nn.Parameter(ln.weight.detach() * 1.5, requires_grad=False)  # a new tensor elsewhere
    after = engine.generate([[5, 9, 77]], params)[0]
    assert len(calls) == 14 and len(checks) == 2
    monkeypatch.setenv("FALCONLM_FUSED_DECODE", "0")
    plain = Engine(model, Tokenizer.from_pretrained(checkpoint), EngineConfig(enable_prefix_caching=False))
    reference = plain.generate([[5, 9, 77]], params)[0]
    assert after.token_ids == reference.token_ids
    first = [step.logprob for step in after.logprobs], [step.logprob for step in reference.logprobs]
    assert first[0] == pytest.approx(first[1], rel=1e-3, abs=1e-3)  # the torch path with the new weight...
    assert before.logprobs[0].logprob != pytest.approx(after.logprobs[0].logprob, rel=1e-4)  # ...not the old one


def test_a_model_that_stops_running_fused_between_runs_takes_the_torch_path_for_the_whole_next_run(
    checkpoint: Path, monkeypatch
) -> None:
    model = load_quantized(checkpoint, quantize="int8", dtype=torch.float32)
    from falconlm.tokenizer import Tokenizer

    # a model step per schedule: each goes through the decoder's entry that ``counting`` sees
    config = EngineConfig(enable_prefix_caching=False, num_scheduler_steps=1)
    engine = Engine(model, Tokenizer.from_pretrained(checkpoint), config)
    params = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)]
    calls = counting(model)
    engine.generate([[5, 9, 77]], params)
    assert len(calls) == 7
    attention = model.transformer.h[1].self_attention
    plain = torch.nn.Linear(attention.dense.in_features, attention.dense.out_features, bias=False)
    torch.nn.init.normal_(plain.weight, std=0.02, generator=torch.Generator().manual_seed(0))
    attention.dense = plain  # a float32 matrix: the fused step no longer applies
    assert unsupported(model.transformer) is not None
    fused_run = engine.generate([[5, 9, 77]], params)[0].token_ids
    assert len(calls) == 7  # no step of the run went native, the first (which checks) nor the later ones
    monkeypatch.setenv("FALCONLM_FUSED_DECODE", "0")
    reference = Engine(model, Tokenizer.from_pretrained(checkpoint), EngineConfig(enable_prefix_caching=False))
    assert fused_run == reference.generate([[5, 9, 77]], params)[0].token_ids


def test_a_run_sees_layernorm_weights_changed_in_place_in_a_bfloat16_model(checkpoint: Path) -> None:
    model = load_quantized(checkpoint, quantize="int8", dtype=torch.bfloat16)
    from falconlm.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(checkpoint)
    params = [SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0)]
    engine = Engine(model, tok, EngineConfig(enable_prefix_caching=False))
    calls = counting(model)
    before = engine.generate([[5, 9, 77]], params)[0]
    ln = _first_layernorm(model)
    with torch.no_grad():
        ln.weight.data.mul_(1.5)  # the same tensor: no pointer moves, only the values
    after = engine.generate([[5, 9, 77]], params)[0]
    assert len(calls) == 10  # both runs' decode steps went native
    twin = copy.deepcopy(model)  # a decoder of its own, bound to the changed values from the start
    fresh = Engine(twin, tok, EngineConfig(enable_prefix_caching=False)).generate([[5, 9, 77]], params)[0]
    assert after.token_ids == fresh.token_ids
    assert [s.logprob for s in after.logprobs] == [s.logprob for s in fresh.logprobs]
    assert before.logprobs[1].logprob != after.logprobs[1].logprob  # a decode step, through the fused call


def test_a_full_dense_cache_is_refused_as_before(checkpoint: Path) -> None:
    model = load_quantized(checkpoint, quantize="int8", dtype=torch.float32)
    cache = KVCache(model.config, 1, 3, torch.float32)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), kv_cache=cache)
        with pytest.raises(ValueError, match="KV cache holds 3 positions"):
            _fused_step(model, torch.tensor([[4]]), cache)


def test_models_it_cannot_run_keep_the_torch_path(tiny_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    tiny = load_quantized(tiny_checkpoint, quantize="int8").transformer
    assert fused_decoder(tiny) is None and "head_dim 16" in unsupported(tiny)
    rw = make_hf_checkpoint(tmp_path / "rw", "rw", hidden_size=96, num_attention_heads=6)  # head_dim 16
    assert "head_dim 16" in unsupported(load_quantized(rw, quantize="int8").transformer)
    seven = make_hf_checkpoint(tmp_path / "7b", "7b", **SHAPES["7b"])
    reference = load_quantized(seven, quantize="int8", kernel="reference")
    assert "native kernel" in unsupported(reference.transformer) and fused_decoder(reference.transformer) is None
    plain = FalconForCausalLM.from_pretrained(seven)  # float32 weights
    assert fused_decoder(plain.transformer) is None and "bfloat16" in unsupported(plain.transformer)
    quantized = load_quantized(seven, quantize="int8").transformer
    monkeypatch.setenv("FALCONLM_FUSED_DECODE", "0")
    assert fused_decoder(quantized) is None
    monkeypatch.delenv("FALCONLM_FUSED_DECODE")
    assert fused_decoder(quantized) is not None
    model = quantize_model(FalconForCausalLM.from_pretrained(seven), QuantRecipe.parse("int4"))
    assert fused_decoder(model.transformer) is not None  # in-place quantization qualifies too


def test_a_copied_model_decodes_with_its_own_weights_and_a_dropped_one_is_freed(checkpoint: Path) -> None:
    model = load_quantized(checkpoint, quantize="int8", dtype=torch.float32)
    original, _ = _teacher_forced(model, True, torch.float32)
    twin = copy.deepcopy(model)
    calls = counting(twin)
    copied, _ = _teacher_forced(twin, True, torch.float32)
    assert calls and torch.equal(copied, original)
    for p in twin.parameters():  # the twin's own tensors change; the original's decoder must not see it
        p.data.mul_(0.5)
    assert _rel(_teacher_forced(model, True, torch.float32)[0], original) < 1e-6
    gc.collect()
    alive = weakref.ref(twin.transformer)
    del twin
    assert alive() is None  # freed at once: the model holds no reference cycle through its decoder


def test_a_step_whose_rows_and_hidden_states_disagree_is_refused(checkpoint: Path) -> None:
    model = load_quantized(checkpoint, quantize="int8", dtype=torch.float32)
    cache = KVCache(model.config, 2, 8, torch.float32)
    rows = DecodeRows(
        cache.k, cache.v, cache.k.stride(0), cache.k.stride(1), cache.k.stride(3), cache.k.stride(2), 8,
        torch.arange(2)[:, None], torch.tensor([1, 1]),
    )  # fmt: skip
    d = model.config.head_dim
    one_row = torch.zeros(1, 1, model.config.hidden_size)
    with pytest.raises(ValueError, match="decode step of 2 rows"):
        fused_decoder(model.transformer)(one_row, torch.ones(1, 1, 1, 1, d), torch.zeros(1, 1, 1, 1, d), rows)


def test_the_native_structs_match_their_ctypes_mirrors(isa: str) -> None:
    from falconlm import native

    lib = native.kernels()
    check_layout(lib)  # raises on any difference
    buffer = (ctypes.c_int64 * 64)()
    assert list(buffer[: lib.falcon_struct_layout(buffer)]) == python_layout()
    assert python_layout()[0] == 7 * 8  # Weight: seven 8-byte fields
