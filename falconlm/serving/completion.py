"""``POST /v1/completions``: prompts in, a CompletionResponse or a stream of CompletionStreamResponse out."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from ..engine.async_engine import EngineError
from ..engine.sampler import TokenLogprobs
from .base import Serving, build_off_loop
from .errors import bad_request
from .generation import Choice, Generation, engine_error, new_request_id
from .inputs import completion_prompts, sampling_params
from .logprobs import completion_logprobs
from .protocol import (
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
)


class CompletionServing(Serving):
    """Turns a CompletionRequest into engine requests and their outputs into OpenAI's completion objects."""

    async def create(self, request: CompletionRequest) -> CompletionResponse | AsyncIterator[CompletionStreamResponse]:
        """The response, or with ``stream`` its chunks; raises APIError (also midway through the chunks)."""
        arrival = time.monotonic()
        self.check_request(request)
        prompts = completion_prompts(self.engine, request.prompt)
        if len(prompts) > self.settings.max_choices:
            raise bad_request(f"prompt: at most {self.settings.max_choices} prompts (--max-choices)", "prompt")
        params = [sampling_params(self.engine, request, len(ids), "prompt") for _, ids in prompts]
        prompt_logprobs = await self._prompt_logprobs(request, prompts)
        retry = self.settings.retry_after_seconds
        response_id = new_request_id("cmpl")
        generation = await Generation.start(
            self.engine, response_id, [ids for _, ids in prompts], params, self.metrics, arrival, retry
        )
        if request.stream:
            return self._stream(request, generation, response_id, prompts, prompt_logprobs)
        with self.open_requests.track(generation.stream):
            choices = await generation.run_to_end(retry)
        return await build_off_loop(
            lambda: CompletionResponse(
                id=response_id,
                model=self.settings.model_name,
                choices=[self._choice(request, c, prompts, prompt_logprobs) for c in choices],
                usage=generation.usage(),
            )
        )

    async def _prompt_logprobs(
        self, request: CompletionRequest, prompts: list[tuple[str, list[int]]]
    ) -> list[list[TokenLogprobs | None]] | None:
        """With echo and logprobs, the prompt tokens' logprobs (the first one null), one list per prompt."""
        if not (request.echo and request.logprobs is not None):
            return None
        try:
            return [await self.engine.prompt_logprobs(ids, request.logprobs) for _, ids in prompts]
        except Exception as exc:
            raise engine_error(exc, self.settings.retry_after_seconds) from exc

    def _choice(
        self,
        request: CompletionRequest,
        choice: Choice,
        prompts: list[tuple[str, list[int]]],
        prompt_logprobs: list[list[TokenLogprobs | None]] | None,
    ) -> CompletionResponseChoice:
        text, ids = prompts[choice.prompt_index]
        logprobs = None
        if request.logprobs is not None and prompt_logprobs is not None:  # echo
            entries = [*prompt_logprobs[choice.prompt_index], *choice.logprobs]
            logprobs = completion_logprobs([*ids, *choice.token_ids], entries, self.texts)
        elif request.logprobs is not None:
            logprobs = completion_logprobs(choice.token_ids, choice.logprobs, self.texts)
        return CompletionResponseChoice(
            index=choice.index,
            text=(text if request.echo else "") + choice.text,
            logprobs=logprobs,
            finish_reason=choice.finish_reason,
            stop_reason=choice.stop_reason,
        )

    async def _stream(
        self,
        request: CompletionRequest,
        generation: Generation,
        response_id: str,
        prompts: list[tuple[str, list[int]]],
        prompt_logprobs: list[list[TokenLogprobs | None]] | None,
    ) -> AsyncIterator[CompletionStreamResponse]:
        model = self.settings.model_name
        want_logprobs = request.logprobs is not None
        offsets = [0] * len(generation.choices)

        def chunk(
            index: int, text: str, token_ids: list[int], entries: list, finish: str | None = None
        ) -> CompletionStreamResponse:
            logprobs = None
            if want_logprobs:
                logprobs = completion_logprobs(token_ids, entries, self.texts, offsets[index])
                if logprobs.tokens:
                    offsets[index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
            item = CompletionResponseStreamChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish)
            return CompletionStreamResponse(id=response_id, model=model, choices=[item])

        try:
            if request.echo:
                for c in generation.choices:
                    text, ids = prompts[c.prompt_index]
                    entries = prompt_logprobs[c.prompt_index] if prompt_logprobs else []
                    yield chunk(c.index, text, ids if want_logprobs else [], entries)
            try:
                async for choice, out in self.outputs(generation):
                    new_ids = out.token_ids if want_logprobs else []
                    if not (out.text or out.finished or new_ids):
                        continue
                    entries = choice.logprobs[-len(new_ids) :] if new_ids else []
                    finish = choice.finish_reason if out.finished else None
                    yield chunk(choice.index, out.text, new_ids, entries, finish)
                if request.stream_options and request.stream_options.include_usage:
                    usage = generation.usage()
                    yield CompletionStreamResponse(id=response_id, model=model, choices=[], usage=usage)
            except EngineError as exc:
                raise engine_error(exc, self.settings.retry_after_seconds) from exc
        finally:
            generation.abort()
