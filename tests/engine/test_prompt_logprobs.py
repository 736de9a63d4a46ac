"""Prompt logprobs computed inside the engine step equal a dense forward over the prompt."""

from __future__ import annotations

import pytest
import torch

from falconlm import FalconForCausalLM, SamplingParams, Tokenizer
from falconlm.engine.engine import Engine, EngineConfig


@pytest.fixture(scope="module")
def engine_parts(tiny_checkpoint):
    model = FalconForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    return model, Tokenizer.from_pretrained(tiny_checkpoint)


def _dense(model: FalconForCausalLM, prompt: list[int], num_top: int) -> tuple[list[float], list[list[int]]]:
    """The logprob of each prompt token after the first, and the ids of the ``num_top`` best, from one forward."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([prompt]))[0, :-1].float(), -1)
    chosen = logprobs.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0].tolist()
    return chosen, logprobs.topk(num_top, dim=-1).indices.tolist()


def _check(out, model, prompt, num_top):
    entries = out.prompt_logprobs
    assert entries is not None and len(entries) == len(prompt) and entries[0] is None
    chosen, top_ids = _dense(model, prompt, num_top)
    assert [e.token_id for e in entries[1:]] == prompt[1:]
    assert [e.logprob for e in entries[1:]] == pytest.approx(chosen, abs=1e-4)
    assert [[t for t, _ in e.top] for e in entries[1:]] == top_ids
    assert all(len(e.top) == num_top for e in entries[1:])


@pytest.mark.parametrize("budget", [512, 7])  # one step, or a prompt chunked over several steps
def test_prompt_logprobs_equal_a_dense_forward(engine_parts, budget):
    model, tok = engine_parts
    prompts = [tok.encode("Once upon a time there was a little fox"), tok.encode("The bear said hello to the fox")]
    engine = Engine(model, tok, EngineConfig(block_size=4, max_num_batched_tokens=budget))
    with_lp = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=3)
    without = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    outs = engine.generate(prompts, [with_lp, without])
    _check(outs[0], model, prompts[0], 3)
    assert outs[1].prompt_logprobs is None
    plain = Engine(model, tok, EngineConfig(block_size=4)).generate(prompts[:1], [without])[0]
    assert outs[0].token_ids == plain.token_ids  # scoring the prompt changes no sampled token


def test_prompt_logprobs_skip_the_prefix_cache_and_survive_preemption(engine_parts):
    model, tok = engine_parts
    prompt = tok.encode("Once upon a time there was a little fox who lived in the forest. Every day the fox ran")
    engine = Engine(model, tok, EngineConfig(block_size=4))
    engine.generate([prompt], [SamplingParams(max_tokens=2, temperature=0.0)])
    hits = engine.stats().num_prefix_hit_tokens
    out = engine.generate([prompt], [SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=0)])[0]
    assert engine.stats().num_prefix_hit_tokens == hits  # it computed its whole prompt
    _check(out, model, prompt, 0)

    num_blocks = -(-(len(prompt) + 24) // 4)  # room for one request alone: the others get preempted
    small = Engine(model, tok, EngineConfig(block_size=4, num_blocks=num_blocks, max_num_batched_tokens=64))
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    outs = small.generate([prompt, prompt[:-3], prompt[:-6]], [params] * 3)
    assert small.stats().num_preemptions > 0
    for p, o in zip([prompt, prompt[:-3], prompt[:-6]], outs, strict=True):
        _check(o, model, p, 2)


def test_prompt_logprobs_setting_is_checked():
    with pytest.raises(ValueError, match="prompt_logprobs must be in"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(ValueError, match="prompt_logprobs must be an integer"):
        SamplingParams(prompt_logprobs=1.5)


def test_llm_returns_prompt_logprobs(tiny_checkpoint, engine_parts):
    from falconlm.llm import LLM

    model, _ = engine_parts
    llm = LLM(tiny_checkpoint, dtype="float32", device="cpu")
    prompt = [5, 9, 14, 3, 7, 21]
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=2, prompt_logprobs=1))
    _check(out, model, prompt, 1)
    assert out.prompt_logprobs is out.outputs[0].prompt_logprobs
