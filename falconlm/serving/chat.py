"""``POST /v1/chat/completions``: messages rendered by the chat template; a ChatCompletionResponse or a stream
of chunks (a role chunk per choice, content deltas, and a chunk carrying ``finish_reason``). With ``tools``
the replies are read for tool calls (``tools.py``, ``tool_stream.py``)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

from ..engine.async_engine import EngineError
from ..engine.sampling_params import SamplingParams, StructuredOutputParams
from .base import Serving, build_off_loop
from .errors import CONFLICTING_PARAMETERS, bad_request, from_value_error
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
from .structured_output import check_constraint, constraint_param
from .tool_stream import ToolDeltas, finish_reason, reply_message
from .tools import TOOLS_MISMATCH_PHRASE, ToolPlan, plan_tools


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
        plan = plan_tools(request)
        add_generation_prompt = request.add_generation_prompt is not False
        prompt_ids = await chat_prompt(self.engine, request.messages, add_generation_prompt, plan.tools)
        params = _with_tool_schema(sampling_params(self.engine, request, len(prompt_ids), "messages"), plan, request)
        await check_constraint(self.engine, request, [params], plan.schema_param)
        response_id = new_request_id("chatcmpl")
        retry = self.settings.retry_after_seconds
        generation = await Generation.start(
            self.engine, response_id, [prompt_ids], [params], self.metrics, arrival, retry
        )
        if request.stream:
            return self._stream(request, generation, response_id, plan)
        with self.open_requests.track(generation.stream):
            choices = await generation.run_to_end(retry)
        return await build_off_loop(
            lambda: ChatCompletionResponse(
                id=response_id,
                model=self.settings.model_name,
                choices=[self._choice(request, c, plan) for c in choices],
                usage=generation.usage(),
            )
        )

    def _num_top(self, request: ChatCompletionRequest) -> int:
        return request.top_logprobs or 0

    def _choice(self, request: ChatCompletionRequest, choice: Choice, plan: ToolPlan) -> ChatCompletionResponseChoice:
        logprobs = chat_logprobs(choice.logprobs, self.texts, self._num_top(request)) if request.logprobs else None
        message = ChatCompletionMessage(content=choice.text)
        finish = choice.finish_reason
        if plan.parses_calls:
            content, calls = reply_message(plan, choice.text)
            message = ChatCompletionMessage(content=content, tool_calls=calls or None)
            finish = finish_reason(finish, bool(calls))
        return ChatCompletionResponseChoice(
            index=choice.index,
            message=message,
            logprobs=logprobs,
            finish_reason=finish,
            stop_reason=choice.stop_reason,
        )

    async def _stream(
        self, request: ChatCompletionRequest, generation: Generation, response_id: str, plan: ToolPlan
    ) -> AsyncIterator[ChatCompletionStreamResponse]:
        model = self.settings.model_name
        tool_deltas = {c.index: ToolDeltas(plan) for c in generation.choices} if plan.parses_calls else {}

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
                    if tool_deltas:
                        calls = tool_deltas[choice.index]
                        content, deltas = calls.feed(out.text)
                        if out.finished:
                            rest, more = calls.finish()
                            content, deltas = _join(content, rest), deltas + more
                            finish = finish_reason(finish, calls.made_calls)
                        for item in deltas:
                            yield chunk(
                                ChatCompletionResponseStreamChoice(
                                    index=choice.index, delta=DeltaMessage(tool_calls=[item])
                                )
                            )
                        if not (content or out.finished or new_ids):
                            continue
                        delta = DeltaMessage(content=content) if content else DeltaMessage()
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


def _join(first: str | None, second: str | None) -> str | None:
    return (first or "") + (second or "") or None


def _with_tool_schema(params: SamplingParams, plan: ToolPlan, request: ChatCompletionRequest) -> SamplingParams:
    """The params with the structured output that a ``required`` or named tool_choice needs."""
    if plan.schema is None:
        return params
    if params.structured_output is not None:
        other = constraint_param(request) or "response_format"
        raise bad_request(
            f"tool_choice {plan.mode!r} {TOOLS_MISMATCH_PHRASE} {other}: both constrain the reply; send one",
            "tool_choice",
            CONFLICTING_PARAMETERS,
        )
    return dataclasses.replace(params, structured_output=StructuredOutputParams(json_schema=plan.schema))
