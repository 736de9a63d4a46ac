"""n > 1 as one parent request: child ids and seeds, and the engine running the children."""

from __future__ import annotations

import pytest
import torch

from falconlm import FalconForCausalLM, SamplingParams, Tokenizer
from falconlm.engine.engine import Engine, EngineConfig
from falconlm.engine.errors import DuplicateRequestIdError
from falconlm.engine.parallel_sampling import child_seed, child_sequences, sequence_ids


@pytest.fixture(scope="module")
def engine_parts(tiny_checkpoint):
    return FalconForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32), Tokenizer.from_pretrained(
        tiny_checkpoint
    )


def test_child_ids_and_seeds():
    assert sequence_ids("r", 1) == ["r"] and sequence_ids("r", 3) == ["r-0", "r-1", "r-2"]
    children = child_sequences("r", SamplingParams(n=3, seed=2**63 - 2))
    assert [c.request_id for c in children] == ["r-0", "r-1", "r-2"]
    assert [c.index for c in children] == [0, 1, 2]
    assert [c.params.seed for c in children] == [2**63 - 2, 2**63 - 1, -(2**63)]  # wrapped, as the API did
    assert all(c.params.n == 1 for c in children)
    assert child_seed(5, 2) == 7
    assert [c.params.seed for c in child_sequences("r", SamplingParams(n=2))] == [None, None]
    single = SamplingParams(seed=9)
    assert child_sequences("r", single)[0].params is single


def _run(engine: Engine) -> dict[str, object]:
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def test_children_sample_as_separate_seeded_requests(engine_parts):
    model, tok = engine_parts
    prompt = tok.encode("Once upon a time there was a little fox who lived in the forest")
    params = SamplingParams(n=3, seed=11, max_tokens=8, temperature=1.0, ignore_eos=True)
    engine = Engine(model, tok, EngineConfig(block_size=4))
    assert engine.add_request("p", prompt, params) == ["p-0", "p-1", "p-2"]
    with pytest.raises(DuplicateRequestIdError):
        engine.add_request("p-1", prompt, SamplingParams())
    done = _run(engine)
    assert {out.parent_id for out in done.values()} == {"p"}
    assert [done[f"p-{i}"].output.index for i in range(3)] == [0, 1, 2]
    separate = Engine(model, tok, EngineConfig(block_size=4))
    for i in range(3):
        separate.add_request(
            f"s{i}", prompt, SamplingParams(seed=11 + i, max_tokens=8, temperature=1.0, ignore_eos=True)
        )
    alone = _run(separate)
    assert [done[f"p-{i}"].output.token_ids for i in range(3)] == [alone[f"s{i}"].output.token_ids for i in range(3)]
    assert len({tuple(out.output.token_ids) for out in done.values()}) > 1  # the seeds differ
    engine.add_request("p", prompt, params)  # the parent's id is free again once every child finished


def test_later_children_share_the_prompts_blocks_and_abort_by_parent_frees_all(engine_parts):
    model, tok = engine_parts
    prompt = tok.encode("Once upon a time there was a little fox who lived in the forest. Every day")
    engine = Engine(model, tok, EngineConfig(block_size=4, max_num_seqs=1))  # children admitted one by one
    engine.add_request("p", prompt, SamplingParams(n=3, max_tokens=2, temperature=0.0, ignore_eos=True))
    done = _run(engine)
    assert len(done) == 3
    stats = engine.stats()
    full_blocks = (len(prompt) - 1) // 4
    assert stats.num_prefix_hit_tokens >= 2 * 4 * full_blocks  # children 1 and 2 reuse child 0's full blocks
    engine.add_request("q", prompt, SamplingParams(n=2, max_tokens=50, ignore_eos=True))
    engine.step()
    engine.abort("q")
    assert not engine.has_unfinished()
    assert engine.stats().num_blocks_in_use == 0
    engine.add_request("r", prompt, SamplingParams(n=2, max_tokens=50, ignore_eos=True))
    engine.abort("r-0")
    engine.abort("r-1")  # each child aborted by its own id: the parent id is free again
    assert engine.add_request("r", prompt, SamplingParams(max_tokens=1)) == ["r"]
