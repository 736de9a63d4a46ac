"""One request validator for every front end (LLM, server, batch): token ids, prompt length, max_tokens.

Each check raises a typed error from ``errors.py``; the engine runs them all on ``add_request`` so bad input
never reaches a shared step, and front ends call the single checks early to answer in their own words.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .errors import MaxTokensTooLargeError, PromptTooLongError, TokenIdOutOfVocabError
from .sampling_params import SamplingParams


def check_token_ids(ids: Iterable[object], vocab_size: int, param: str = "prompt") -> list[int]:
    """``ids`` as a list of ints in ``[0, vocab_size)``; TokenIdOutOfVocabError for the first that is not."""
    out = list(ids)
    for token_id in out:
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
            raise TokenIdOutOfVocabError(token_id, vocab_size, param)
    return out


def check_prompt_length(num_prompt_tokens: int, limit: int) -> int:
    """Room left for output after the prompt within ``limit`` tokens; PromptTooLongError when there is none."""
    room = limit - num_prompt_tokens
    if room < 1:
        raise PromptTooLongError(num_prompt_tokens, limit)
    return room


def check_max_tokens(num_prompt_tokens: int, max_tokens: int | None, limit: int, what: str = "context") -> None:
    """MaxTokensTooLargeError when the prompt plus ``max_tokens`` (None: no limit) exceed ``limit`` tokens."""
    if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
        raise MaxTokensTooLargeError(num_prompt_tokens, max_tokens, limit, what)


@dataclass(frozen=True)
class RequestValidator:
    """The model's limits: its vocabulary, its context and the KV pool's capacity in tokens."""

    vocab_size: int
    max_model_len: int
    kv_capacity_tokens: int

    @property
    def context_limit(self) -> int:
        """The longest request (prompt + output) that can run: the context, or the KV pool if smaller."""
        return min(self.max_model_len, self.kv_capacity_tokens)

    def validate(self, prompt_token_ids: Iterable[object], params: SamplingParams) -> list[int]:
        """The prompt as checked token ids; raises the first typed error that applies."""
        ids = check_token_ids(prompt_token_ids, self.vocab_size, "prompt")
        check_prompt_length(len(ids), self.max_model_len)
        check_token_ids(params.logit_bias or {}, self.vocab_size, "logit_bias")
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        check_max_tokens(len(ids), max_tokens, self.kv_capacity_tokens, "KV cache capacity")
        return ids
