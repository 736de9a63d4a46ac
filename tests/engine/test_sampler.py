"""Tests for SamplingParams validation and the batch Sampler."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from falconlm.engine.sampler import (
    Sampler,
    SamplerOutput,
    TokenLogprobs,
    apply_transforms,
    make_generator,
)
from falconlm.engine.sampling_params import SamplingParams

# ---------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 0),
        ("n", 1.5),
        ("max_tokens", 0),
        ("max_tokens", "16"),
        ("temperature", -1),
        ("temperature", "hot"),
        ("temperature", float("nan")),
        ("temperature", True),
        ("top_p", 0),
        ("top_p", 1.01),
        ("top_p", None),
        ("top_k", -2),
        ("top_k", 2.5),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("repetition_penalty", 0),
        ("repetition_penalty", -1.0),
        ("presence_penalty", 2.01),
        ("presence_penalty", -2.5),
        ("frequency_penalty", 3),
        ("frequency_penalty", "0"),
        ("logprobs", -1),
        ("logprobs", 21),
        ("logprobs", 2.0),
        ("stop", ""),
        ("stop", ["ok", ""]),
        ("stop", 5),
        ("stop", ["ok", 3]),
        ("stop_token_ids", ["a"]),
        ("stop_token_ids", [-1]),
        ("logit_bias", {1: 100.5}),
        ("logit_bias", {1: -101}),
        ("logit_bias", {"a": 1.0}),
        ("logit_bias", [1]),
        ("seed", "7"),
        ("seed", 1.0),
        ("ignore_eos", "yes"),
        ("skip_special_tokens", 1),
    ],
)
def test_validation_error_names_field(field: str, value: object) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    assert str(info.value).startswith(field), str(info.value)


def test_validation_message_example() -> None:
    with pytest.raises(ValueError, match=r"^temperature must be >= 0, got -1$"):
        SamplingParams(temperature=-1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"top_p": 1.0, "min_p": 0.0},
        {"min_p": 1.0, "top_k": -1},
        {"temperature": 0, "max_tokens": None},
        {"logprobs": 0},
        {"logprobs": 20},
        {"logit_bias": {5: 100, 6: -100}},
        {"presence_penalty": -2, "frequency_penalty": 2},
        {"seed": 0},
    ],
)
def test_valid_edges_accepted(kwargs: dict[str, object]) -> None:
    SamplingParams(**kwargs)


def test_normalization() -> None:
    assert SamplingParams().stop == []
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams().stop_token_ids == []
    params = SamplingParams(temperature=0, logit_bias={3: 1})
    assert isinstance(params.temperature, float)
    assert params.logit_bias == {3: 1.0}


def test_greedy_property() -> None:
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(top_k=1).greedy
    assert not SamplingParams().greedy
    assert not SamplingParams(temperature=0.01, top_k=2).greedy


# ---------------------------------------------------------------- helpers


def _run(
    logits: torch.Tensor,
    params: list[SamplingParams],
    prompt_ids: list[list[int]] | None = None,
    output_ids: list[list[int]] | None = None,
    generators: list[torch.Generator | None] | None = None,
) -> SamplerOutput:
    rows = logits.shape[0]
    return Sampler()(
        logits,
        params,
        prompt_ids if prompt_ids is not None else [[] for _ in range(rows)],
        output_ids if output_ids is not None else [[] for _ in range(rows)],
        generators if generators is not None else [None] * rows,
    )


def _transform(
    logits: list[float],
    params: SamplingParams,
    prompt_ids: Sequence[int] = (),
    output_ids: Sequence[int] = (),
) -> torch.Tensor:
    out = apply_transforms(torch.tensor([logits]), [params], [list(prompt_ids)], [list(output_ids)])
    return out[0]


def _support(row: torch.Tensor) -> set[int]:
    return set(torch.isfinite(row).nonzero().flatten().tolist())


# Probabilities 0.5, 0.3, 0.1, 0.06, 0.04, placed out of order in the vocabulary.
_PROBS = {3: 0.5, 0: 0.3, 4: 0.1, 1: 0.06, 2: 0.04}
_LOGITS = [math.log(_PROBS[i]) for i in range(5)]


# ---------------------------------------------------------------- greedy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 300).to(dtype)
    out = _run(logits, [SamplingParams(temperature=0)] * 8)
    assert out.token_ids == logits.float().argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 8


def test_top_k_one_equals_greedy() -> None:
    torch.manual_seed(1)
    logits = torch.randn(6, 200)
    greedy = _run(logits, [SamplingParams(temperature=0)] * 6).token_ids
    top1 = _run(logits, [SamplingParams(temperature=1.0, top_k=1)] * 6).token_ids
    assert top1 == greedy == logits.argmax(dim=-1).tolist()


def test_greedy_uses_penalized_logits() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0]])
    params = [SamplingParams(temperature=0, repetition_penalty=2.0)]
    assert _run(logits, params, [[]], [[0]]).token_ids == [1]  # 3/2 = 1.5 < 2


def test_mixed_batch_keeps_row_order() -> None:
    logits = torch.full((4, 10), -50.0)
    for row, token in enumerate([2, 7, 5, 9]):
        logits[row, token] = 50.0
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, seed=3),
        SamplingParams(top_k=1),
        SamplingParams(temperature=0.5),
    ]
    gens = [None, make_generator(3), None, None]
    assert _run(logits, params, generators=gens).token_ids == [2, 7, 5, 9]


# ---------------------------------------------------------------- seeds


def _seeded_draws(seed: int, steps: int = 50) -> list[int]:
    torch.manual_seed(999 + seed)  # the global RNG must not matter
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(42))
    gen = make_generator(seed)
    return [_run(logits, [SamplingParams(seed=seed)], generators=[gen]).token_ids[0] for _ in range(steps)]


def test_seeded_reproducible() -> None:
    first = _seeded_draws(123)
    assert first == _seeded_draws(123)
    assert len(set(first)) > 10  # really sampling, not stuck on one token
    assert first != _seeded_draws(124)


def test_make_generator() -> None:
    assert make_generator(None) is None
    a, b = make_generator(5), make_generator(5)
    assert a is not None and b is not None
    assert torch.equal(torch.rand(10, generator=a), torch.rand(10, generator=b))


def test_seeded_row_independent_of_batch() -> None:
    vocab, steps = 500, 50
    base = torch.randn(4, vocab, generator=torch.Generator().manual_seed(7))
    target = SamplingParams(seed=11, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.2)
    others = [
        SamplingParams(temperature=1.3),  # unseeded, no top_k: forces the full-sort path
        SamplingParams(seed=12, min_p=0.05, presence_penalty=0.5),
        SamplingParams(temperature=0),
    ]

    def run(batch: bool) -> list[int]:
        torch.manual_seed(0 if batch else 1)
        gen = make_generator(11)
        history: list[int] = []
        for _ in range(steps):
            if batch:
                logits = base
                params = [others[0], target, others[1], others[2]]
                gens = [None, gen, make_generator(12), None]
                row = 1
            else:
                logits = base[1:2]
                params, gens, row = [target], [gen], 0
            outs = [history] * len(params)
            prompts = [[1, 2, 3]] * len(params)
            history = [*history, _run(logits, params, prompts, outs, gens).token_ids[row]]
        return history

    alone = run(batch=False)
    assert len(set(alone)) > 5
    assert alone == run(batch=True)


# ---------------------------------------------------------------- penalties


def test_repetition_penalty_exact() -> None:
    logits = [2.0, -1.0, 0.5, -3.0, 1.0]
    out = _transform(logits, SamplingParams(repetition_penalty=2.0), prompt_ids=[0], output_ids=[1, 1])
    assert out.tolist() == [1.0, -2.0, 0.5, -3.0, 1.0]


def test_presence_frequency_exact() -> None:
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = _transform([0.0] * 6, params, prompt_ids=[0, 0, 0, 5], output_ids=[1, 2, 2, 2])
    assert out.tolist() == [0.0, -0.75, -1.25, 0.0, 0.0, 0.0]


def test_negative_penalties_boost() -> None:
    params = SamplingParams(presence_penalty=-1.0, frequency_penalty=-0.5)
    out = _transform([0.0] * 3, params, output_ids=[2, 2])
    assert out.tolist() == [0.0, 0.0, 2.0]


def test_bias_applies_before_repetition_penalty() -> None:
    params = SamplingParams(logit_bias={0: 3.0, 1: -1.0}, repetition_penalty=2.0)
    out = _transform([1.0, -1.0, 1.0], params, prompt_ids=[0, 1])
    assert out.tolist() == [2.0, -4.0, 1.0]  # (1+3)/2, (-1-1)*2


def test_all_penalties_together() -> None:
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=0.5)
    out = _transform([4.0, 4.0, 4.0], params, prompt_ids=[0], output_ids=[1, 1])
    assert out.tolist() == [2.0, 2.0 - 1.0 - 1.0, 4.0]


def test_penalties_batch_rows_do_not_leak() -> None:
    logits = torch.ones(3, 4)
    params = [
        SamplingParams(repetition_penalty=2.0),
        SamplingParams(),
        SamplingParams(frequency_penalty=1.0),
    ]
    out = apply_transforms(logits, params, [[0], [0], [0]], [[1], [1, 2], [3, 3]])
    assert out.tolist() == [
        [0.5, 0.5, 1.0, 1.0],
        [1.0, 1.0, 1.0, 1.0],
        [1.0, 1.0, 1.0, -1.0],
    ]


def test_input_logits_untouched() -> None:
    logits = torch.randn(2, 20)
    before = logits.clone()
    params = [
        SamplingParams(logit_bias={1: 5.0}, repetition_penalty=1.5, top_p=0.5, temperature=0.7),
        SamplingParams(temperature=0, presence_penalty=1.0),
    ]
    _run(logits, params, [[1, 2], [3]], [[4], [5]])
    apply_transforms(logits, params, [[1, 2], [3]], [[4], [5]])
    assert torch.equal(logits, before)


# ---------------------------------------------------------------- filters


@pytest.mark.parametrize(
    ("min_p", "expected"),
    [(0.0, {0, 1, 2, 3, 4}), (0.15, {3, 0, 4}), (0.5, {3, 0}), (1.0, {3})],
)
def test_min_p_support(min_p: float, expected: set[int]) -> None:
    assert _support(_transform(_LOGITS, SamplingParams(min_p=min_p))) == expected


def test_temperature_applies_before_min_p() -> None:
    # Ratios to the top probability: T=1 -> 1, .6, .2, ...; T=2 -> 1, .77, .45, .35, .28.
    assert _support(_transform(_LOGITS, SamplingParams(min_p=0.4))) == {3, 0}
    assert _support(_transform(_LOGITS, SamplingParams(min_p=0.4, temperature=2.0))) == {3, 0, 4}


@pytest.mark.parametrize(("k", "expected"), [(2, {3, 0}), (3, {3, 0, 4}), (5, set(range(5))), (9, set(range(5)))])
def test_top_k_support(k: int, expected: set[int]) -> None:
    out = _transform(_LOGITS, SamplingParams(top_k=k))
    assert _support(out) == expected
    kept = sorted(expected)
    assert torch.equal(out[kept], torch.tensor(_LOGITS)[kept])  # kept logits unchanged


@pytest.mark.parametrize("off", [0, -1])
def test_top_k_off(off: int) -> None:
    assert _support(_transform(_LOGITS, SamplingParams(top_k=off))) == set(range(5))


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [(0.01, {3}), (0.45, {3}), (0.75, {3, 0}), (0.85, {3, 0, 4}), (0.95, {3, 0, 4, 1}), (1.0, set(range(5)))],
)
def test_top_p_support(top_p: float, expected: set[int]) -> None:
    assert _support(_transform(_LOGITS, SamplingParams(top_p=top_p))) == expected


def test_top_p_after_top_k_renormalizes() -> None:
    # top_k=4 leaves .5 .3 .1 .06 -> renormalized .521 .3125 ...; cumulative .833 >= .82 after two.
    # Without the renormalization .5 + .3 = .8 < .82 and three tokens would stay.
    params = SamplingParams(top_k=4, top_p=0.82)
    assert _support(_transform(_LOGITS, params)) == {3, 0}
    assert _support(_transform(_LOGITS, SamplingParams(top_p=0.82))) == {3, 0, 4}


def test_top_k_path_matches_sort_path() -> None:
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(3))
    target = SamplingParams(top_k=50, top_p=0.8, temperature=0.9)
    alone = apply_transforms(logits, [target], [[]], [[]])  # every row has top_k: topk path
    batch = apply_transforms(logits.repeat(2, 1), [SamplingParams(top_p=0.5), target], [[]] * 2, [[]] * 2)
    assert torch.equal(alone[0], batch[1])


def test_greedy_rows_skip_filters() -> None:
    out = _transform(_LOGITS, SamplingParams(temperature=0, top_p=0.1, min_p=0.9))
    assert torch.equal(out, torch.tensor(_LOGITS))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    temperature=st.floats(0.05, 3.0),
    top_p=st.floats(0.01, 1.0),
    top_k=st.integers(-1, 40),
    min_p=st.floats(0.0, 1.0),
    penalty=st.floats(0.5, 2.0),
)
def test_sample_always_in_support(
    seed: int, temperature: float, top_p: float, top_k: int, min_p: float, penalty: float
) -> None:
    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(seed)) * 3
    params = [
        SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=penalty),
        SamplingParams(seed=seed, top_p=top_p, min_p=min_p),
    ]
    prompts, outs = [[1, 2], [3]], [[5, 5], []]
    support = apply_transforms(logits, params, prompts, outs)
    assert torch.isfinite(support).any(dim=-1).all()
    if 1 < top_k < 64:  # top_k=1 is greedy: apply_transforms leaves it unfiltered
        assert int(torch.isfinite(support[0]).sum()) <= top_k
    for _ in range(5):
        ids = _run(logits, params, prompts, outs, [None, make_generator(seed)]).token_ids
        assert all(math.isfinite(float(support[row, tok])) for row, tok in enumerate(ids))


# ---------------------------------------------------------------- logit_bias


def test_logit_bias_forces_token() -> None:
    logits = torch.randn(200, 50, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(logit_bias={17: 100.0})] * 200
    assert _run(logits, params).token_ids == [17] * 200
    assert _run(logits[:1], [SamplingParams(temperature=0, logit_bias={17: 100.0})]).token_ids == [17]


def test_logit_bias_bans_token() -> None:
    logits = torch.tensor([[5.0, 1.0, 0.0]])
    params = [SamplingParams(temperature=0, logit_bias={0: -100.0})]
    assert _run(logits, params).token_ids == [1]


def test_logit_bias_out_of_vocab() -> None:
    with pytest.raises(ValueError, match="logit_bias"):
        _run(torch.zeros(1, 10), [SamplingParams(logit_bias={10: 1.0})])


# ---------------------------------------------------------------- logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs(dtype: torch.dtype) -> None:
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(8)).to(dtype)
    params = [
        SamplingParams(logprobs=None),
        SamplingParams(logprobs=0, temperature=0.5, repetition_penalty=1.5),
        SamplingParams(logprobs=5, temperature=0, logit_bias={0: 20.0}),
        SamplingParams(logprobs=20, top_k=3, seed=1),
    ]
    out = _run(logits, params, [[1, 2]] * 4, [[3]] * 4, [None, None, None, make_generator(1)])
    raw = torch.log_softmax(logits.float(), dim=-1)
    assert out.logprobs[0] is None
    assert out.token_ids[2] == 0  # the bias moved the token but not the logprobs
    for row, n in [(1, 0), (2, 5), (3, 20)]:
        lp = out.logprobs[row]
        assert isinstance(lp, TokenLogprobs)
        assert lp.token_id == out.token_ids[row]
        assert lp.logprob == pytest.approx(float(raw[row, lp.token_id]), abs=1e-5)
        assert len(lp.top) == n
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        expected_ids = torch.topk(raw[row], n).indices.tolist() if n else []
        assert [t for t, _ in lp.top] == expected_ids
        for token, value in lp.top:
            assert value == pytest.approx(float(raw[row, token]), abs=1e-5)


# ---------------------------------------------------------------- distribution


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_frequencies(temperature: float) -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    expected = torch.softmax(logits / temperature, dim=-1)
    rows = 20_000
    torch.manual_seed(2024)
    ids = _run(logits.expand(rows, 4), [SamplingParams(temperature=temperature)] * rows).token_ids
    freq = torch.bincount(torch.tensor(ids), minlength=4).float() / rows
    assert torch.allclose(freq, expected, atol=0.015), (freq, expected)


def test_seeded_generator_frequencies() -> None:
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    params = [SamplingParams(temperature=0.7, seed=77)]
    gen = make_generator(77)
    draws = [_run(logits, params, generators=[gen]).token_ids[0] for _ in range(3000)]
    freq = torch.bincount(torch.tensor(draws), minlength=3).float() / len(draws)
    expected = torch.softmax(logits[0] / 0.7, dim=-1)
    assert torch.allclose(freq, expected, atol=0.035), (freq, expected)


# ---------------------------------------------------------------- batch checks


def test_length_mismatch_rejected() -> None:
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, 5), [SamplingParams()], [[], []], [[], []], [None, None])
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, 5), [SamplingParams()] * 2, [[], []], [[], []], [None])
