"""The engine factory: one place that resolves the device and dtype, loads, sizes the KV pool and builds."""

from __future__ import annotations

import pytest
import torch

from falconlm.engine.factory import EngineArgs, build_engine, kv_cache_bytes
from falconlm.engine.memory import free_memory
from falconlm.engine.sampling_params import SamplingParams
from falconlm.llm import LLM


def test_build_engine_applies_the_settings(tiny_checkpoint):
    args = EngineArgs(
        tiny_checkpoint,
        dtype="float32",
        device="cpu",
        max_model_len=64,
        max_num_seqs=3,
        block_size=8,
        enable_prefix_caching=False,
        max_waiting=5,
        num_scheduler_steps=4,
    )
    engine = build_engine(args)
    assert engine.model.transformer.ln_f.weight.dtype == torch.float32
    assert engine.max_model_len == 64 and engine.config.max_num_batched_tokens == 512
    assert engine.stats().num_blocks == 3 * 64 // 8  # max_num_seqs full contexts
    assert engine.scheduler.max_waiting == 5 and not engine.kv_cache_manager.enable_prefix_caching
    assert engine.validator.context_limit == 64 and engine.tokenizer.eos_token_id is not None
    assert engine.config.num_scheduler_steps == 4


def test_bad_settings_are_one_line_value_errors(tiny_checkpoint):
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1"):
        build_engine(EngineArgs(tiny_checkpoint, dtype="float32", max_num_seqs=0))
    with pytest.raises(ValueError, match="num_scheduler_steps must be >= 1"):
        build_engine(EngineArgs(tiny_checkpoint, dtype="float32", num_scheduler_steps=0))
    with pytest.raises(ValueError, match="dtype 'int3' is not supported"):
        build_engine(EngineArgs(tiny_checkpoint, dtype="int3"))


def test_kv_cache_fraction_becomes_bytes_of_the_free_memory():
    cpu = torch.device("cpu")
    assert kv_cache_bytes(None, cpu) is None and kv_cache_bytes(1234, cpu) == 1234
    free = free_memory(cpu)
    assert free is not None
    assert abs(kv_cache_bytes(0.5, cpu) - free // 2) < free // 10  # free memory moves a little meanwhile


def test_llm_uses_the_factory_and_fans_out_n(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, dtype="float32", device="cpu", max_model_len=64)
    assert llm.engine.max_model_len == 64 and llm.max_model_len == 64
    params = SamplingParams(n=3, seed=4, max_tokens=5, temperature=1.0, ignore_eos=True)
    (out,) = llm.generate([[5, 6, 7, 8]], params)
    assert [o.index for o in out.outputs] == [0, 1, 2] and all(len(o.token_ids) == 5 for o in out.outputs)
    for i, child in enumerate(out.outputs):  # child i samples as a request seeded seed + i
        alone = llm.generate([[5, 6, 7, 8]], SamplingParams(seed=4 + i, max_tokens=5, temperature=1.0, ignore_eos=True))
        assert alone[0].token_ids == child.token_ids
    assert llm.engine.stats().num_running == llm.engine.stats().num_waiting == 0
