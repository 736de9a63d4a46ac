"""The one request validator: typed errors (still ValueErrors) for ids, lengths and max_tokens."""

from __future__ import annotations

import pytest

from falconlm.engine.errors import (
    InvalidRequestError,
    MaxTokensTooLargeError,
    PromptTooLongError,
    TokenIdOutOfVocabError,
)
from falconlm.engine.sampling_params import SamplingParams
from falconlm.engine.validation import RequestValidator, check_max_tokens, check_prompt_length, check_token_ids

VALIDATOR = RequestValidator(vocab_size=100, max_model_len=32, kv_capacity_tokens=48)


def test_token_ids_in_the_vocabulary_pass_and_others_name_the_first_bad_one():
    assert check_token_ids((0, 5, 99), 100) == [0, 5, 99]
    for bad in (100, -1, True, "7", 2.0):
        with pytest.raises(TokenIdOutOfVocabError) as info:
            check_token_ids([1, bad, 200], 100, "prompt")
        assert info.value.token_id == bad and info.value.param == "prompt"
        assert str(info.value) == f"prompt token id {bad!r} is outside the vocabulary [0, 100)"
        assert isinstance(info.value, ValueError)


def test_prompt_length_leaves_room_for_a_token():
    assert check_prompt_length(31, 32) == 1
    with pytest.raises(PromptTooLongError, match="prompt has 32 tokens, the model's context is 32") as info:
        check_prompt_length(32, 32)
    assert (info.value.num_prompt_tokens, info.value.limit) == (32, 32)


def test_max_tokens_past_the_limit():
    check_max_tokens(10, 22, 32)
    check_max_tokens(10, None, 32)
    with pytest.raises(MaxTokensTooLargeError) as info:
        check_max_tokens(10, 23, 32)
    assert (info.value.max_tokens, info.value.param) == (23, "max_tokens")


def test_validator_runs_every_check_in_the_engines_words():
    assert VALIDATOR.context_limit == 32
    assert VALIDATOR.validate([1, 2, 3], SamplingParams(max_tokens=4)) == [1, 2, 3]
    with pytest.raises(TokenIdOutOfVocabError, match="logit_bias token id 100"):
        VALIDATOR.validate([1], SamplingParams(logit_bias={100: 1.0}))
    with pytest.raises(PromptTooLongError):
        VALIDATOR.validate(list(range(32)), SamplingParams())
    small_pool = RequestValidator(vocab_size=100, max_model_len=32, kv_capacity_tokens=16)
    with pytest.raises(MaxTokensTooLargeError, match=r"plus max_tokens \(10\) exceeds the KV cache capacity of 16"):
        small_pool.validate(list(range(8)), SamplingParams(max_tokens=10))
    with pytest.raises(InvalidRequestError):  # max_tokens None: the rest of the context, past the pool
        small_pool.validate(list(range(8)), SamplingParams(max_tokens=None))
