"""Generation through the offline API: batching, sampling controls, stops, logprobs, validation."""

from __future__ import annotations

import pytest
import torch

from falconlm import LLM, SamplingParams

from .oracle import uncached_greedy


@pytest.fixture(scope="module")
def llm(tiny_checkpoint) -> LLM:
    return LLM(tiny_checkpoint, dtype="float32", device="cpu")


def test_greedy_matches_uncached_oracle_for_a_mixed_length_batch(llm):
    prompts = ["Once upon a time", "The fox", "One day she met a big bear and they played"]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs, strict=True):
        expected = uncached_greedy(llm.model, llm.tokenizer.encode(prompt), 12)
        assert out.token_ids == expected, prompt
        assert out.finish_reason == "length"
        assert out.text == llm.tokenizer.decode(out.token_ids)


def test_token_id_prompts_equal_string_prompts(llm):
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    ids = llm.tokenizer.encode("The bear said hello")
    by_text, by_ids = llm.generate(["The bear said hello"], params)[0], llm.generate([ids], params)[0]
    assert by_text.token_ids == by_ids.token_ids and by_ids.prompt_token_ids == ids


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    seeded = SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
    alone = llm.generate(["Once upon a time"], seeded)[0].token_ids
    again = llm.generate(["Once upon a time"], seeded)[0].token_ids
    other = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    beside = llm.generate(["The fox ran", "Once upon a time", "Numbers"], [other, seeded, other])[1].token_ids
    assert alone == again == beside
    different = llm.generate(["Once upon a time"], SamplingParams(max_tokens=16, seed=99, ignore_eos=True))
    assert different[0].token_ids != alone


def test_top_k_one_equals_greedy(llm):
    greedy = llm.generate(["The moon"], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    top1 = llm.generate(["The moon"], SamplingParams(max_tokens=10, temperature=1.3, top_k=1, seed=5, ignore_eos=True))
    assert greedy[0].token_ids == top1[0].token_ids


def test_stop_string_across_token_boundaries_is_cut(llm):
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    prompt = "Once upon a time the fox"
    full = llm.generate([prompt], params)[0]
    # A two-character stop string whose first occurrence straddles a boundary between two tokens.
    pieces = [llm.tokenizer.decode([t]) for t in full.token_ids]
    boundaries = [len("".join(pieces[:i])) for i in range(1, len(pieces))]
    candidates = [full.text[b - 1 : b + 1] for b in boundaries if 0 < b < len(full.text)]
    stop = next(c for c, b in zip(candidates, boundaries, strict=False) if full.text.find(c) == b - 1)
    stopped = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop=[stop]))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.find(stop)]


def test_stop_token_ids_and_eos_finish_with_stop(llm):
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    full = llm.generate(["The fox"], params)[0]
    stop_id = full.token_ids[3]
    out = llm.generate(
        ["The fox"], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_id])
    )[0]
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[: full.token_ids.index(stop_id) + 1]


def test_logprobs_shapes_and_values(llm):
    out = llm.generate(["Once upon"], SamplingParams(max_tokens=5, temperature=0.0, logprobs=3, ignore_eos=True))[0]
    assert len(out.logprobs) == 5
    ids = llm.tokenizer.encode("Once upon")
    with torch.no_grad():
        logits = llm.model(torch.tensor([ids]))[0, -1].float()
    expected = torch.log_softmax(logits, -1)
    first = out.logprobs[0]
    assert first.token_id == out.token_ids[0]
    assert first.logprob == pytest.approx(expected[first.token_id].item(), abs=1e-4)
    assert len(first.top) == 3 and [t for t, _ in first.top] == expected.topk(3).indices.tolist()


def test_n_returns_distinct_children(llm):
    out = llm.generate(["Once"], SamplingParams(n=3, max_tokens=8, seed=7, ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1


def test_max_tokens_none_fills_the_context(llm):
    prompt = llm.tokenizer.encode("Once upon a time")
    out = llm.generate([prompt], SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == llm.max_model_len - len(prompt) and out.finish_reason == "length"


def test_stream_pieces_join_to_the_text(llm):
    params = SamplingParams(max_tokens=15, temperature=0.0, ignore_eos=True)
    assert "".join(llm.stream("The fox", params)) == llm.generate(["The fox"], params)[0].text


@pytest.mark.parametrize(
    ("prompt", "message"),
    [([], "empty"), ([10**6], "outside the vocabulary"), ([1] * 500, "context")],
)
def test_bad_prompts_raise_value_errors(llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        llm.generate([prompt], SamplingParams(max_tokens=4))


def test_mismatched_params_list_is_rejected(llm):
    with pytest.raises(ValueError, match="sampling params"):
        llm.generate(["a", "b"], [SamplingParams()])
