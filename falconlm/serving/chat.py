"""``POST /v1/chat/completions``: messages rendered by the chat template; a ChatCompletionResponse or a stream
of chunks (a role chunk per choice, content deltas, and a chunk carrying ``finish_reason``)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from ..engine.async_engine import EngineError
from .base import Serving, build_off_loop
from .errors import from_value_error
from .generation import Choice, Generation, engine_error, new_request_id
from .inputs import chat_prompt, sampling_params
from .logprobs import chat_logprobs
from .protocol import (
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    DeltaMessage,
)
from .structured_output import check_constraint


class ChatServing(Serving):
    """Turns a ChatCompletionRequest into engine requests and their outputs into OpenAI's chat objects."""

    async def create(
        self, request: ChatCompletionRequest
    ) -> ChatCompletionResponse | AsyncIterator[ChatCompletionStreamResponse]:
        """The response, or with ``stream`` its chunks; raises APIError (also midway through the chunks)."""
        arrival = time.monotonic()
        self.check_request(request)
        try:
            request.check_supported()
        except ValueError as exc:
            raise from_value_error(exc) from exc
        add_generation_prompt = request.add_generation_prompt is not False
        prompt_ids = await chat_prompt(self.engine, request.messages, add_generation_prompt)
        params = sampling_params(self.engine, request, len(prompt_ids), "messages")
        await check_constraint(self.engine, request, [params])
        response_id = new_request_id("chatcmpl")
        retry = self.settings.retry_after_seconds
        generation = await Generation.start(
            self.engine, response_id, [prompt_ids], [params], self.metrics, arrival, retry
        )
        if request.stream:
            return self._stream(request, generation, response_id)
        with self.open_requests.track(generation.stream):
            choices = await generation.run_to_end(retry)
        return await build_off_loop(
            lambda: ChatCompletionResponse(
                id=response_id,
                model=self.settings.model_name,
                choices=[self._choice(request, c) for c in choices],
                usage=generation.usage(),
            )
        )

    def _num_top(self, request: ChatCompletionRequest) -> int:
        return request.top_logprobs or 0

    def _choice(self, request: ChatCompletionRequest, choice: Choice) -> ChatCompletionResponseChoice:
        logprobs = chat_logprobs(choice.logprobs, self.texts, self._num_top(request)) if request.logprobs else None
        return ChatCompletionResponseChoice(
            index=choice.index,
            message=ChatCompletionMessage(content=choice.text),
            logprobs=logprobs,
            finish_reason=choice.finish_reason,
            stop_reason=choice.stop_reason,
        )

    async def _stream(
        self, request: ChatCompletionRequest, generation: Generation, response_id: str
    ) -> AsyncIterator[ChatCompletionStreamResponse]:
        model = self.settings.model_name

        def chunk(item: ChatCompletionResponseStreamChoice) -> ChatCompletionStreamResponse:
            return ChatCompletionStreamResponse(id=response_id, model=model, choices=[item])

        try:
            for c in generation.choices:
                yield chunk(
                    ChatCompletionResponseStreamChoice(index=c.index, delta=DeltaMessage(role="assistant", content=""))
                )
            try:
                async for choice, out in self.outputs(generation):
                    new_ids = out.token_ids if request.logprobs else []
                    if not (out.text or out.finished or new_ids):
                        continue
                    logprobs = None
                    if new_ids:
                        entries = choice.logprobs[-len(new_ids) :]
                        logprobs = chat_logprobs(entries, self.texts, self._num_top(request))
                    delta = DeltaMessage(content=out.text) if out.text else DeltaMessage()
                    finish = choice.finish_reason if out.finished else None
                    yield chunk(
                        ChatCompletionResponseStreamChoice(
                            index=choice.index, delta=delta, logprobs=logprobs, finish_reason=finish
                        )
                    )
                if request.stream_options and request.stream_options.include_usage:
                    usage = generation.usage()
                    yield ChatCompletionStreamResponse(id=response_id, model=model, choices=[], usage=usage)
            except EngineError as exc:
                raise engine_error(exc, self.settings.retry_after_seconds) from exc
        finally:
            generation.abort()
