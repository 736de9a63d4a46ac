"""``POST /v1/embeddings``: inputs in, one pooled vector per input out (``engine/pooling.py`` says which states and
how they are pooled).

Each input is an engine request with :class:`PoolingParams`, all added at once (all or none), so they are batched
with every other request in the engine's steps and never touch the KV cache. Bad input is a 400 naming its field
before anything reaches the engine: an empty input or list, a token id outside the vocabulary, an input longer than
the context (unless ``truncate_prompt_tokens`` asks to cut it), ``dimensions`` over the hidden size.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence

import numpy as np

from ..engine.async_engine import AsyncEngine, EngineError
from ..engine.pooling import PoolingParams, truncate_prompt
from .drain import OpenRequests
from .embedding_protocol import MAX_EMBEDDING_INPUTS, EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from .errors import CONTEXT_LENGTH_PHRASE, EngineUnavailable, bad_request
from .generation import engine_error, new_request_id
from .inputs import check_model, check_token_ids
from .metrics import ServerMetrics
from .settings import ServerSettings


def check_generation_task(engine: AsyncEngine) -> None:
    """400 for a generation request to a server that runs its model for embeddings only (``--task embed``), as
    vLLM answers a route its model does not support."""
    if engine.is_ready and engine.engine.config.task == "embed":  # not loaded yet: the engine's call answers 503
        raise bad_request(
            "this server runs its model for embeddings only (--task embed): use /v1/embeddings", None, "wrong_task"
        )


class EmbeddingServing:
    """Turns an EmbeddingRequest into engine requests and their vectors into an EmbeddingResponse."""

    def __init__(
        self,
        engine: AsyncEngine,
        settings: ServerSettings,
        metrics: ServerMetrics,
        open_requests: OpenRequests | None = None,
    ) -> None:
        self.engine, self.settings, self.metrics = engine, settings, metrics
        self.open_requests = open_requests if open_requests is not None else OpenRequests()

    async def create(self, request: EmbeddingRequest) -> EmbeddingResponse:
        """The response; raises APIError."""
        check_model(request.model, self.settings)
        retry = self.settings.retry_after_seconds
        try:
            hidden_size = self.engine.engine.model.config.hidden_size
        except EngineError as exc:  # loading, or failed to load
            raise engine_error(exc, retry) from exc
        if request.dimensions is not None and request.dimensions > hidden_size:
            raise bad_request(f"dimensions must be at most the model's hidden size {hidden_size}", "dimensions")
        inputs = await self._token_inputs(request)
        params = PoolingParams(dimensions=request.dimensions, normalize=request.normalize)
        response_id = new_request_id("embd")
        requests = [(f"{response_id}-{i}", ids, params) for i, ids in enumerate(inputs)]
        try:
            stream = await self.engine.add(requests)
        except Exception as exc:
            raise engine_error(exc, retry) from exc
        num_tokens = sum(len(ids) for ids in inputs)
        self.metrics.embedding_requests.inc()
        self.metrics.embedding_prompt_tokens.inc(num_tokens)
        index = {request_id: i for i, (request_id, _, _) in enumerate(requests)}
        vectors: list[list[float] | None] = [None] * len(inputs)
        try:
            with self.open_requests.track(stream):
                async with stream:
                    async for out in stream:
                        vectors[index[out.request_id]] = out.embedding
        except EngineError as exc:
            raise engine_error(exc, retry) from exc
        if any(v is None for v in vectors):  # aborted: the server is shutting down
            raise EngineUnavailable("the server stopped before the embeddings were computed", retry)
        return await asyncio.to_thread(self._response, request, vectors, num_tokens)  # big replies take a while

    async def _token_inputs(self, request: EmbeddingRequest) -> list[list[int]]:
        """Each input as checked token ids (strings tokenized off the event loop), truncated when asked."""
        items = _input_items(request.input)
        if not items:
            raise bad_request("input must not be empty", "input")
        if len(items) > MAX_EMBEDDING_INPUTS:
            raise bad_request(f"input: at most {MAX_EMBEDDING_INPUTS} inputs in one request", "input")
        vocab_size = self.engine.vocab_size
        tokenizer = self.engine.tokenizer
        for item in items:
            if not isinstance(item, str):
                check_token_ids(item, vocab_size, "input")

        def encode() -> list[list[int]]:
            return [tokenizer.encode(item) if isinstance(item, str) else list(item) for item in items]

        try:
            token_inputs = await asyncio.to_thread(encode)
        except ValueError as exc:  # no tokenizer: text inputs need one
            raise bad_request(str(exc), "input") from exc
        limit = self.engine.max_model_len
        out = []
        for i, ids in enumerate(token_inputs):
            ids = truncate_prompt(ids, request.truncate_prompt_tokens)
            if not ids:
                raise bad_request(f"input[{i}] is empty (it encodes to no tokens)", "input")
            if len(ids) > limit:
                raise bad_request(
                    f"input[{i}] has {len(ids)} tokens but this model's {CONTEXT_LENGTH_PHRASE} is {limit} tokens; "
                    "shorten it or set truncate_prompt_tokens",
                    "input",
                )
            out.append(ids)
        return out

    def _response(
        self, request: EmbeddingRequest, vectors: Sequence[list[float]], num_tokens: int
    ) -> EmbeddingResponse:
        as_base64 = request.encoding_format == "base64"
        data = [EmbeddingData(index=i, embedding=_base64_float32(v) if as_base64 else v) for i, v in enumerate(vectors)]
        usage = EmbeddingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens)
        return EmbeddingResponse(data=data, model=self.settings.model_name, usage=usage)


def _input_items(value: str | list) -> list[str | list[int]]:
    """The inputs of ``input``: one string, one token id list, or a list of either."""
    if isinstance(value, str):
        return [value]
    if value and isinstance(value[0], int):
        return [value]
    return list(value)


def _base64_float32(vector: list[float]) -> str:
    """OpenAI's base64 encoding: the vector's little-endian float32 bytes."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
