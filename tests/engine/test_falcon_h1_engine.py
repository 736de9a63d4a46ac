"""Falcon-H1 through the Engine: paged KV blocks for its attention and a recurrent-state slot for its Mamba-2
heads, per request. Batched requests of different lengths each equal their greedy continuation alone (the uncached
full forward), with chunked prefill, preemption (slot and blocks freed, state rebuilt by recomputation), LLM on a
quantized H1 folder, and the engine's stats saying prefix caching is off and why."""

from __future__ import annotations

import pytest
import torch

from falconlm.engine.engine import Engine, EngineConfig
from falconlm.engine.hybrid_runner import HybridRunner
from falconlm.engine.sampling_params import SamplingParams
from falconlm.model.falcon_h1 import FalconH1ForCausalLM
from falconlm.model.formats import load_pretrained
from falconlm.tokenizer import NoTokenizer
from tests.model.h1_checkpoints import save_hf_h1
from tests.oracle import assert_greedy_agrees, uncached_greedy

PROMPTS = [list(range(1, 14)), [5, 6], list(range(20, 41)), [3], [9, 9, 9, 9, 9, 9]]
STEPS = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_hf_h1(tmp_path_factory.mktemp("h1") / "ckpt")


@pytest.fixture(scope="module")
def model(folder):
    return load_pretrained(folder, torch.float32, "cpu")


@pytest.fixture(scope="module")
def expected(model):
    return [uncached_greedy(model, p, STEPS) for p in PROMPTS]


def _engine(model, **settings) -> Engine:
    config = EngineConfig(max_num_seqs=8, max_model_len=128, **settings)
    return Engine(model, NoTokenizer(None, "the test has none"), config)


def _run(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True)
    return [out.token_ids for out in engine.generate(prompts, [params] * len(prompts))]


def test_h1_gets_the_hybrid_runner_and_no_prefix_cache(model) -> None:
    assert isinstance(model, FalconH1ForCausalLM)
    engine = _engine(model, enable_prefix_caching=True)
    assert isinstance(engine.runner, HybridRunner)
    stats = engine.kv_cache_manager.stats()
    assert stats.num_state_slots == 8 and stats.num_blocks > 0
    assert stats.prefix_cache_enabled is False and "recurrent" in stats.prefix_cache_disabled_reason


def test_batched_requests_each_equal_their_request_alone(model, expected) -> None:
    assert _run(_engine(model), PROMPTS) == expected
    for prompt, want in zip(PROMPTS, expected, strict=True):
        assert _run(_engine(model), [prompt]) == [want]


def test_chunked_prefill_mixed_with_decodes(model, expected) -> None:
    """Prompts in chunks of 5 tokens beside other requests' decode steps: the states continue across chunks."""
    engine = _engine(model, max_num_batched_tokens=5)
    assert _run(engine, PROMPTS) == expected


def test_preemption_frees_the_state_and_recomputation_rebuilds_it(model, expected) -> None:
    engine = _engine(model, num_blocks=10, block_size=4)  # 40 KV positions for five requests: some must wait
    assert _run(engine, PROMPTS) == expected
    assert engine.scheduler.num_preemptions > 0
    stats = engine.kv_cache_manager.stats()
    assert stats.num_free_state_slots == stats.num_state_slots and stats.num_free_blocks == stats.num_blocks


def test_state_slots_fewer_than_sequences(model, expected) -> None:
    """A memory budget that holds only two sequences' states: the others wait for a slot, then run."""
    per_sequence = model.config.ssm_state_bytes_per_sequence(conv_bytes=4)
    c = model.config
    one_context = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4 * 128  # K and V, 128 positions
    engine = _engine(model, kv_cache_memory=one_context + 2 * per_sequence + per_sequence // 2)
    assert engine.kv_cache_manager.stats().num_state_slots == 2
    assert _run(engine, PROMPTS) == expected


@pytest.mark.parametrize("spec", ["int8", "int4"])
def test_llm_serves_a_quantized_h1(folder, spec) -> None:
    """LLM over the plain folder, quantized on load: greedy tokens equal the quantized model's own uncached
    greedy tokens (valid ids, the requested count)."""
    from falconlm.llm import LLM

    llm = LLM(str(folder), quantize=spec, dtype="float32", max_num_seqs=4, skip_tokenizer_init=True)
    params = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True)
    outs = llm.generate(PROMPTS[:3], params)
    for prompt, out in zip(PROMPTS[:3], outs, strict=True):
        tokens = out.outputs[0].token_ids
        assert len(tokens) == STEPS and all(0 <= t < 97 for t in tokens)
        assert tokens == uncached_greedy(llm.model, prompt, STEPS)


def test_bfloat16_engine_agrees_with_transformers_bfloat16(folder) -> None:
    """bfloat16 weights and activations (native matmuls bound by the engine, float32 SSM state) give
    transformers' bfloat16 greedy tokens for each prompt, up to near-ties (``assert_greedy_agrees``)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.FalconH1ForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ours = load_pretrained(folder, torch.bfloat16, "cpu")
    engine = _engine(ours)
    prompts = PROMPTS[:3]
    for prompt, got in zip(prompts, _run(engine, prompts), strict=True):
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
        assert_greedy_agrees(got, want[0, len(prompt) :].tolist(), prompt, ours, lambda ids: hf(ids).logits)
