"""A Falcon-Mamba model through the Engine: continuous batching with mixed prefill chunks and decode steps over
state slots; each request equals its greedy continuation alone, with chunked prefill, slot shortage and
preemption (state freed, rebuilt by recomputation)."""

from __future__ import annotations

import pytest
import torch

from falconlm.engine.engine import Engine, EngineConfig
from falconlm.engine.recurrent_runner import RecurrentRunner
from falconlm.engine.sampling_params import SamplingParams
from falconlm.model.formats import load_pretrained
from falconlm.tokenizer import NoTokenizer
from tests.model.mamba_checkpoints import save_hf_mamba
from tests.oracle import uncached_greedy

PROMPTS = [[5, 9, 2], list(range(10, 31)), [7], list(range(40, 53)), [3, 3, 3, 3, 3, 3]]
STEPS = 7


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mamba")
    save_hf_mamba(folder, eos_token_id=None)
    return load_pretrained(folder, torch.float32, "cpu")


@pytest.fixture(scope="module")
def expected(model):
    return [uncached_greedy(model, p, STEPS) for p in PROMPTS]


def _engine(model, **settings) -> Engine:
    config = EngineConfig(max_num_seqs=8, max_model_len=128, **settings)
    return Engine(model, NoTokenizer(None, "the test has none"), config)


def _greedy() -> SamplingParams:
    return SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True)


def test_batched_requests_equal_each_alone(model, expected):
    engine = _engine(model, max_num_batched_tokens=64, num_blocks=8)
    assert isinstance(engine.runner, RecurrentRunner)
    outs = engine.generate(PROMPTS, [_greedy()] * len(PROMPTS))
    assert [o.token_ids for o in outs] == expected


def test_chunked_prefill_and_slot_shortage(model, expected):
    # 5-token budget: long prompts prefill in chunks beside others' decode steps; 2 slots for 5 requests.
    engine = _engine(model, max_num_batched_tokens=5, num_blocks=2)
    outs = engine.generate(PROMPTS, [_greedy()] * len(PROMPTS))
    assert [o.token_ids for o in outs] == expected
    stats = engine.stats()
    assert stats.num_state_slots == 2 and stats.num_free_state_slots == 2
    assert stats.prefix_cache_enabled is False and stats.prefix_cache_disabled_reason


def test_preempted_request_rebuilds_its_state(model, expected):
    engine = _engine(model, max_num_batched_tokens=6, num_blocks=3)
    ids = [f"r{i}" for i in range(len(PROMPTS))]
    for rid, prompt in zip(ids, PROMPTS, strict=True):
        engine.add_request(rid, prompt, _greedy())
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    preempted = set()
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
        # Take the slot of every running request that has started decoding, once: it is freed, the request
        # goes back to the waiting queue and recomputes its state from the first token.
        scheduler = engine.scheduler
        for request in list(scheduler.running):
            if request.num_output_tokens >= 2 and request.request_id not in preempted:
                scheduler._preempt(request)
                preempted.add(request.request_id)
    assert preempted == set(ids)
    assert engine.scheduler.num_preemptions == len(ids)
    assert [tokens[rid] for rid in ids] == expected
    assert engine.stats().num_free_state_slots == 3


def test_prompt_logprobs_equal_the_full_forward(model):
    engine = _engine(model, max_num_batched_tokens=4, num_blocks=2)
    prompt = PROMPTS[1]
    out = engine.generate([prompt], [SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)])[0]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([prompt]))[0].float(), -1)
    got = [entry.logprob for entry in out.prompt_logprobs[1:]]
    want = [float(logprobs[p, prompt[p + 1]]) for p in range(len(prompt) - 1)]
    assert got == pytest.approx(want, abs=1e-4)
