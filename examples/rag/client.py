"""Talking to the server: the openai client, embeddings, the model's context length, and errors a user can act on.

Everything goes through the OpenAI API (``/v1/models``, ``/v1/embeddings``, ``/v1/chat/completions``), so the same
code runs against falconlm, vLLM or any other OpenAI-compatible server. Two extensions that falconlm and vLLM share
are used when the server reports its context length (``max_model_len`` in ``/v1/models``): ``truncate_prompt_tokens``
in embedding requests, and ``POST /tokenize`` to fit the passages into the chat model's context.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import openai

from .errors import RagError


def make_client(base_url: str, api_key: str, timeout: float = 120.0) -> openai.OpenAI:
    """An openai client for ``base_url`` (e.g. ``http://127.0.0.1:8000/v1``) that fails at once instead of retrying."""
    return openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=0)


@contextmanager
def server_errors(client: openai.OpenAI, doing: str) -> Iterator[None]:
    """Turn the openai client's exceptions into a RagError that says what failed and what to do about it."""
    url = str(client.base_url).rstrip("/")
    try:
        yield
    except openai.APITimeoutError as exc:
        raise RagError(f"{doing}: the server at {url} did not answer in time") from exc
    except openai.APIConnectionError as exc:
        raise RagError(
            f"{doing}: cannot reach a server at {url} (is it running? start one with `falconlm serve`, "
            "or pass --base-url)"
        ) from exc
    except openai.AuthenticationError as exc:
        raise RagError(f"{doing}: the server at {url} wants an API key (pass --api-key or set OPENAI_API_KEY)") from exc
    except openai.NotFoundError as exc:
        raise RagError(f"{doing}: the server at {url} answered 404: {_message(exc)}") from exc
    except openai.APIStatusError as exc:
        raise RagError(f"{doing}: the server refused the request ({exc.status_code}): {_message(exc)}") from exc


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            param = f" [param: {error['param']}]" if error.get("param") else ""
            return f"{error['message']}{param}"
    return exc.message


def served_model(client: openai.OpenAI) -> str:
    """The first model the server lists: a falconlm server serves one."""
    with server_errors(client, "listing the server's models"):
        models = client.models.list().data
    if not models:
        raise RagError(f"the server at {client.base_url} lists no models")
    return models[0].id


def context_length(client: openai.OpenAI, model: str) -> int | None:
    """The model's context in tokens, from ``max_model_len`` in ``/v1/models`` (falconlm and vLLM report it)."""
    with server_errors(client, f"looking up model {model!r}"):
        card = client.models.retrieve(model)
    value = getattr(card, "max_model_len", None)
    return value if isinstance(value, int) else None


def embed(
    client: openai.OpenAI,
    model: str,
    texts: list[str],
    batch_size: int = 32,
    truncate_to: int | None = None,
    on_batch: Callable[[int], object] | None = None,
) -> np.ndarray:
    """L2-normalised embeddings of ``texts`` from ``/v1/embeddings``, ``[len(texts), dim]`` float32, in order.

    ``truncate_to`` (the model's context) embeds a longer text from its last ``truncate_to`` tokens instead of
    failing, as sentence-transformers does with its ``max_seq_length``. A character budget cannot rule such texts
    out: a line of box-drawing characters takes three byte-level tokens a character. ``on_batch(n)`` is called
    after each request with the number of texts it embedded (a progress bar's ``update``).
    """
    extra = {"truncate_prompt_tokens": truncate_to} if truncate_to else None
    rows: list[list[float]] = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        with server_errors(client, f"embedding texts {start + 1}-{start + len(batch)} of {len(texts)}"):
            reply = client.embeddings.create(model=model, input=batch, encoding_format="float", extra_body=extra)
        rows.extend(item.embedding for item in sorted(reply.data, key=lambda item: item.index))
        if on_batch is not None:
            on_batch(len(batch))
    vectors = np.asarray(rows, dtype=np.float32)  # [n, dim]
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def count_chat_tokens(client: openai.OpenAI, model: str, messages: list[dict]) -> int | None:
    """The prompt length of ``messages`` after the chat template, from ``POST /tokenize``; None if not served."""
    root = str(client.base_url).rstrip("/").removesuffix("/v1")
    try:
        reply = httpx.post(
            f"{root}/tokenize",
            json={"model": model, "messages": messages},
            headers={"Authorization": f"Bearer {client.api_key}"},
            timeout=client.timeout if isinstance(client.timeout, float) else 60.0,
        )
    except httpx.HTTPError:
        return None
    if reply.status_code != 200:
        return None
    count = reply.json().get("count")
    return count if isinstance(count, int) else None
