"""Typed errors for requests the engine refuses, and for the engine failing; front ends map them to their own
replies (the server to HTTP statuses). Request errors are ValueErrors, so ``except ValueError`` still works."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request the engine cannot run; ``param`` names the input at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class DuplicateRequestIdError(InvalidRequestError):
    """A request id that an unfinished request already uses."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"request id {request_id!r} is already in use", "request_id")
        self.request_id = request_id


class TokenIdOutOfVocabError(InvalidRequestError):
    """A token id (in the prompt or in ``logit_bias``) outside ``[0, vocab_size)``, or not an int at all."""

    def __init__(self, token_id: object, vocab_size: int, param: str) -> None:
        super().__init__(f"{param} token id {token_id!r} is outside the vocabulary [0, {vocab_size})", param)
        self.token_id, self.vocab_size = token_id, vocab_size


class PromptTooLongError(InvalidRequestError):
    """A prompt that leaves no room for one generated token within ``limit`` tokens."""

    def __init__(self, num_prompt_tokens: int, limit: int) -> None:
        super().__init__(f"prompt has {num_prompt_tokens} tokens, the model's context is {limit}", "prompt")
        self.num_prompt_tokens, self.limit = num_prompt_tokens, limit


class MaxTokensTooLargeError(InvalidRequestError):
    """A prompt plus ``max_tokens`` longer than ``limit`` tokens (the context, or the KV pool when smaller)."""

    def __init__(self, num_prompt_tokens: int, max_tokens: int, limit: int, what: str) -> None:
        super().__init__(
            f"prompt ({num_prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the {what} of {limit} tokens",
            "max_tokens",
        )
        self.num_prompt_tokens, self.max_tokens, self.limit = num_prompt_tokens, max_tokens, limit


class EngineError(RuntimeError):
    """The engine failed while running (or loading) a request."""


class EngineNotReadyError(EngineError):
    """The model is still loading."""


class EngineStoppedError(EngineError):
    """The engine is shut down or shutting down and takes no new requests."""
