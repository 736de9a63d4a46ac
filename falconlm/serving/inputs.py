"""From protocol requests to engine inputs: prompts to token ids and sampling params, checked against the model.

Everything that could fail inside an engine step (a token id outside the vocabulary, a request longer than the
context or the KV pool) is rejected here with a 400, so bad input never reaches the shared batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ..engine import validation
from ..engine.async_engine import AsyncEngine
from ..engine.errors import MaxTokensTooLargeError, PromptTooLongError, TokenIdOutOfVocabError
from ..engine.sampling_params import SamplingParams
from .errors import CONTEXT_LENGTH_PHRASE, APIError, bad_request, from_value_error
from .protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from .settings import ServerSettings


def check_model(requested: str | None, settings: ServerSettings) -> None:
    """404 for a model name the server does not serve (None means the served one)."""
    if requested is not None and requested not in settings.served_model_names:
        raise APIError(
            404,
            f"the model {requested!r} does not exist; this server serves {settings.model_name!r}",
            "model",
            "model_not_found",
        )


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    """400 for a token id outside the vocabulary (the engine's validator decides)."""
    try:
        validation.check_token_ids(ids, vocab_size, param)
    except TokenIdOutOfVocabError as exc:
        message = f"{param}: token id {exc.token_id} is outside the vocabulary [0, {vocab_size})"
        raise bad_request(message, param) from exc


def completion_prompts(engine: AsyncEngine, prompt: str | list) -> list[tuple[str, list[int]]]:
    """(text, token ids) for each prompt of a completions request: a string, strings, ids or lists of ids."""
    if isinstance(prompt, str):
        items: list = [prompt]
    elif prompt and isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise bad_request("prompt must not be empty", "prompt")
    tokenizer = engine.tokenizer
    prompts = []
    for item in items:
        if isinstance(item, str):
            ids = tokenizer.encode(item)
            text = item
        else:
            check_token_ids(item, engine.vocab_size, "prompt")
            ids, text = list(item), tokenizer.decode(item)
        if not ids:
            raise bad_request("prompt must not be empty (it encodes to no tokens)", "prompt")
        prompts.append((text, ids))
    return prompts


async def chat_prompt(
    engine: AsyncEngine,
    messages: list[ChatMessage],
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
) -> list[int]:
    """Render messages (and ``tools``) with the chat template and encode them, off the event loop; 400 for
    messages the template rejects or that render past its output or time limit (``falconlm.template_limits``)."""
    if not messages:
        raise bad_request("messages must not be empty", "messages")
    tokenizer = engine.tokenizer
    dicts = [m.to_dict() for m in messages]

    def render() -> list[int]:
        if tools:
            return tokenizer.encode(tokenizer.apply_chat_template(dicts, add_generation_prompt, tools=tools))
        return tokenizer.encode(tokenizer.apply_chat_template(dicts, add_generation_prompt))

    try:
        ids = await asyncio.to_thread(render)
    except ValueError as exc:
        raise bad_request(str(exc), "messages") from exc
    if not ids:
        raise bad_request("messages render to an empty prompt", "messages")
    return ids


def context_limit(engine: AsyncEngine) -> int:
    """The longest request (prompt + output) the server runs: the context, or the KV pool if that is smaller."""
    return engine.validator.context_limit


def sampling_params(
    engine: AsyncEngine, request: CompletionRequest | ChatCompletionRequest, num_prompt_tokens: int, prompt_param: str
) -> SamplingParams:
    """Checked SamplingParams for one prompt; max_tokens null means the rest of the context."""
    limit = context_limit(engine)
    try:
        room = validation.check_prompt_length(num_prompt_tokens, limit)
    except PromptTooLongError as exc:
        raise bad_request(
            f"the prompt has {num_prompt_tokens} tokens but this model's {CONTEXT_LENGTH_PHRASE} is {limit} "
            "tokens, including at least one generated token; shorten the prompt",
            prompt_param,
        ) from exc
    try:
        params = request.to_sampling_params(default_max_tokens=room)
    except ValueError as exc:
        raise from_value_error(exc) from exc
    try:
        validation.check_max_tokens(num_prompt_tokens, params.max_tokens, limit)
    except MaxTokensTooLargeError as exc:
        total = num_prompt_tokens + exc.max_tokens
        raise bad_request(
            f"this model's {CONTEXT_LENGTH_PHRASE} is {limit} tokens; you requested {total} tokens "
            f"({num_prompt_tokens} in the prompt, {exc.max_tokens} for the completion); reduce the prompt "
            "or max_tokens",
            "max_tokens",
        ) from exc
    vocab_size = engine.vocab_size
    if params.logit_bias:
        check_token_ids(list(params.logit_bias), vocab_size, "logit_bias")
    return params
