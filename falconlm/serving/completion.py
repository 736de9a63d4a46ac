"""``POST /v1/completions``: prompts in, a CompletionResponse or a stream of CompletionStreamResponse out."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace

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
from .structured_output import check_constraint


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
        await check_constraint(self.engine, request, params)
        if request.echo and request.logprobs is not None:  # the prompt's logprobs, computed in the engine step
            params = [replace(sp, prompt_logprobs=request.logprobs) for sp in params]
        retry = self.settings.retry_after_seconds
        response_id = new_request_id("cmpl")
        generation = await Generation.start(
            self.engine, response_id, [ids for _, ids in prompts], params, self.metrics, arrival, retry
        )
        if request.stream:
            return self._stream(request, generation, response_id, prompts)
        with self.open_requests.track(generation.stream):
            choices = await generation.run_to_end(retry)
        return await build_off_loop(
            lambda: CompletionResponse(
                id=response_id,
                model=self.settings.model_name,
                choices=[self._choice(request, c, prompts) for c in choices],
                usage=generation.usage(),
            )
        )

    def _choice(
        self,
        request: CompletionRequest,
        choice: Choice,
        prompts: list[tuple[str, list[int]]],
    ) -> CompletionResponseChoice:
        text, ids = prompts[choice.prompt_index]
        logprobs = None
        if request.logprobs is not None and request.echo:
            entries = [*_prompt_entries(choice, ids), *choice.logprobs]
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
            echo_with_first_output: set[int] = set()  # choices whose echo waits for its prompt logprobs
            if request.echo:
                for c in generation.choices:
                    if want_logprobs:
                        echo_with_first_output.add(c.index)
                    else:
                        yield chunk(c.index, prompts[c.prompt_index][0], [], [])
            try:
                async for choice, out in self.outputs(generation):
                    if choice.index in echo_with_first_output:
                        echo_with_first_output.discard(choice.index)
                        text, ids = prompts[choice.prompt_index]
                        yield chunk(choice.index, text, ids, _prompt_entries(choice, ids))
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


def _prompt_entries(choice: Choice, prompt_ids: list[int]) -> list[TokenLogprobs | None]:
    """The choice's prompt logprobs from the engine (all None if it ended before computing its prompt)."""
    return choice.prompt_logprobs if choice.prompt_logprobs is not None else [None] * len(prompt_ids)
