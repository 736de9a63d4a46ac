"""RequestStream: one group of engine requests' outputs, handed from the engine thread to an asyncio caller.

The engine thread calls ``_deliver`` / ``_fail`` through :func:`call_threadsafe` (``loop.call_soon_threadsafe``),
so the stream's queue is only ever touched on its event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol

from .engine import StepOutput


class Aborter(Protocol):
    def abort(self, request_ids: Sequence[str]) -> None: ...


class RequestStream:
    """The outputs of a group of engine sequences (one API request's choices), in the order they are produced.

    Iterate it for :class:`StepOutput` items; iteration ends when every sequence has finished. ``abort()`` (or
    leaving ``async with``) stops the unfinished ones.
    """

    def __init__(self, engine: Aborter, request_ids: Sequence[str]) -> None:
        self.request_ids = list(request_ids)  # sequence ids: a request with n > 1 has one per child
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[list[StepOutput] | BaseException] = asyncio.Queue()
        self._pending: deque[StepOutput] = deque()
        self._unfinished = set(self.request_ids)

    @property
    def finished(self) -> bool:
        return not self._unfinished

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StepOutput:
        while not self._pending:
            if not self._unfinished:
                raise StopAsyncIteration
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self._unfinished.clear()
                raise item
            self._pending.extend(out for out in item if out.request_id in self._unfinished)
        out = self._pending.popleft()
        if out.finished:
            self._unfinished.discard(out.request_id)
        return out

    def abort(self) -> None:
        """Abort the sequences that have not finished; safe to call more than once, from any state."""
        if self._unfinished:
            self._engine.abort(list(self._unfinished))
            self._unfinished.clear()

    def fail(self, exc: BaseException) -> None:
        """Abort the unfinished sequences and end the iteration with ``exc`` (after outputs already delivered);
        on the event loop. The server uses it to end open responses when a shutdown runs out of time."""
        if self._unfinished:
            self._engine.abort(list(self._unfinished))
            self._queue.put_nowait(exc)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.abort()

    # ---- called on the event loop by the engine thread (call_threadsafe) ---------------------------------------
    def _deliver(self, outputs: list[StepOutput]) -> None:
        if outputs:
            self._queue.put_nowait(outputs)

    def _fail(self, exc: BaseException) -> None:
        self._queue.put_nowait(exc)


def call_threadsafe(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: object) -> None:
    """``loop.call_soon_threadsafe`` that tolerates a loop already closed (its caller is gone)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def resolve_threadsafe(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future, result: object = None, exc: BaseException | None = None
) -> None:
    """Settle ``future`` on its loop from another thread (once; later calls are ignored)."""

    def settle() -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    call_threadsafe(loop, settle)


def snapshot(out: StepOutput) -> StepOutput:
    """A copy the event loop may read while the engine thread goes on mutating the live CompletionOutput."""
    live = out.output
    output = replace(
        live, token_ids=list(live.token_ids), logprobs=None if live.logprobs is None else list(live.logprobs)
    )
    return replace(out, token_ids=list(out.token_ids), output=output)
