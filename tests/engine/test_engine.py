"""The Engine on a real (tiny) model: paged attention and continuous batching against an uncached oracle."""

from __future__ import annotations

import pytest
import torch

from falconlm import FalconForCausalLM, SamplingParams, Tokenizer
from falconlm.engine.engine import Engine, EngineConfig

from ..conftest import make_hf_checkpoint
from ..oracle import uncached_greedy

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", params=["7b", "40b", "rw"])
def model_and_tokenizer(request, tmp_path_factory):
    path = make_hf_checkpoint(tmp_path_factory.mktemp(f"engine-{request.param}"), request.param)
    return FalconForCausalLM.from_pretrained(path), Tokenizer.from_pretrained(path)


def _oracle(model: FalconForCausalLM, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy tokens from a full, uncached forward over the whole sequence for every new token."""
    return [uncached_greedy(model, prompt, steps) for prompt in prompts]


def _prompts(tok: Tokenizer) -> list[list[int]]:
    texts = [
        "Once upon a time",
        "The fox",
        "One day she met a big bear and they played together in the sun",
        "Numbers like 123",
        "The bear said hello",
    ]
    return [tok.encode(t) for t in texts]


def test_engine_equals_uncached_oracle(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = _prompts(tok)
    expected = _oracle(model, prompts, 12)
    engine = Engine(model, tok, EngineConfig(block_size=4, max_num_batched_tokens=16))  # forces chunked prefill
    got = engine.generate(prompts, [GREEDY] * len(prompts))
    for e, g in zip(expected, got, strict=True):
        assert g.token_ids == e
        assert g.text == tok.decode(e) and g.finish_reason == "length"
    assert engine.kv_cache_manager.num_free_blocks == engine.runner.cache.num_blocks


def test_preemption_still_completes_every_request(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = _prompts(tok)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    expected = _oracle(model, prompts, 24)
    longest = max(len(p) for p in prompts) + 24
    num_blocks = -(-longest // 4)  # room for the longest request alone, far from all five at once
    engine = Engine(model, tok, EngineConfig(block_size=4, num_blocks=num_blocks, max_num_batched_tokens=64))
    got = engine.generate(prompts, [params] * len(prompts))
    assert [g.token_ids for g in got] == expected
    assert engine.kv_cache_manager.num_free_blocks == num_blocks
    with pytest.raises(ValueError, match="KV cache capacity"):
        engine.add_request("too-long", prompts[0], SamplingParams(max_tokens=4 * num_blocks))


def test_prefix_cache_hits_and_changes_nothing(model_and_tokenizer):
    model, tok = model_and_tokenizer
    shared = tok.encode("Once upon a time there was a little fox who lived in the forest. Every day the fox ran")
    a, b = shared + tok.encode(" to the river"), shared + tok.encode(" and played")
    cached = Engine(model, tok, EngineConfig(block_size=4))
    first = cached.generate([a], [GREEDY])[0]
    second = cached.generate([b], [GREEDY])[0]
    assert cached.kv_cache_manager.num_prefix_hit_tokens >= 4 * (len(shared) // 4) - 4
    plain = Engine(model, tok, EngineConfig(block_size=4, enable_prefix_caching=False))
    plain_outs = plain.generate([a, b], [GREEDY, GREEDY])
    assert [o.token_ids for o in plain_outs] == [first.token_ids, second.token_ids]
    assert plain.kv_cache_manager.num_prefix_hit_tokens == 0


def test_seeded_request_is_batch_independent(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = _prompts(tok)
    seeded = SamplingParams(max_tokens=10, temperature=1.0, seed=3, ignore_eos=True)
    other = SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)
    alone = Engine(model, tok).generate([prompts[0]], [seeded])[0].token_ids
    together = Engine(model, tok).generate(prompts, [seeded] + [other] * (len(prompts) - 1))[0].token_ids
    assert alone == together


def test_stop_string_and_abort_free_blocks(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompt = _prompts(tok)[0]
    engine = Engine(model, tok, EngineConfig(block_size=4))
    full = engine.generate([prompt], [GREEDY])[0]
    stop = full.text[3:5]
    if stop:
        cut = engine.generate([prompt], [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop])])[
            0
        ]
        assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    engine.add_request("gone", prompt, GREEDY)
    engine.step()
    engine.abort("gone")
    assert not engine.has_unfinished()
    assert engine.kv_cache_manager.num_free_blocks == engine.runner.cache.num_blocks


def test_paged_logits_match_dense(model_and_tokenizer):
    """One mixed step (a decode beside a prefill chunk) gives the dense model's logits."""
    model, tok = model_and_tokenizer
    prompts = _prompts(tok)[:3]
    engine = Engine(model, tok, EngineConfig(block_size=4, max_num_batched_tokens=256))
    outs = engine.generate(prompts, [SamplingParams(max_tokens=3, temperature=0.0, logprobs=2, ignore_eos=True)] * 3)
    with torch.no_grad():
        for prompt, out in zip(prompts, outs, strict=True):
            ids = torch.tensor([prompt + out.token_ids[:-1]])
            dense = torch.log_softmax(model(ids)[0, -3:].float(), -1)
            for k, lp in enumerate(out.logprobs):
                assert lp.logprob == pytest.approx(dense[k, lp.token_id].item(), abs=1e-4)
