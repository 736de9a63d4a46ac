"""AsyncEngine: one background thread owns the Engine and runs its step loop; asyncio code streams the outputs.

Every Engine call happens on that thread. Callers post commands (add, abort, score, stop) to a thread-safe queue
that the thread drains between steps; with nothing queued and nothing unfinished it blocks on that queue, so an
idle engine uses no CPU. Outputs go back to each caller's ``asyncio.Queue`` through ``loop.call_soon_threadsafe``.

A caller that stops iterating (client gone: ``GeneratorExit`` or ``CancelledError``) aborts its requests; the
abort is applied before the next step, so their KV blocks are free within one step. A failing step fails the
requests in flight with :class:`EngineError` (they cannot hang) and the loop goes on.

Past 400 lines for a reason: RequestStream, the command records and the loop share private hand-offs
(``_deliver``, ``_fail``, the futures) that are easier to check for thread safety in one file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace

import torch

from .engine import Engine, StepOutput
from .outputs import CompletionOutput
from .request import RequestStatus
from .sampler import TokenLogprobs
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)

EngineRequest = tuple[str, Sequence[int], SamplingParams]  # (request_id, prompt_token_ids, params)


class EngineError(RuntimeError):
    """The engine failed while running (or loading) a request."""


class EngineNotReadyError(EngineError):
    """The model is still loading."""


class EngineStoppedError(EngineError):
    """The engine is shut down or shutting down and takes no new requests."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, published by the engine thread after every step."""

    num_running: int = 0
    num_waiting: int = 0
    num_blocks: int = 0
    num_free_blocks: int = 0
    num_prefix_query_tokens: int = 0
    num_prefix_hit_tokens: int = 0
    num_preemptions: int = 0
    num_steps: int = 0

    @property
    def num_blocks_in_use(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def kv_cache_usage(self) -> float:
        return self.num_blocks_in_use / self.num_blocks if self.num_blocks else 0.0


class RequestStream:
    """The outputs of a group of engine requests (one API request's choices), in the order they are produced.

    Iterate it for :class:`StepOutput` items; iteration ends when every request has finished. ``abort()`` (or
    leaving ``async with``) stops the unfinished ones.
    """

    def __init__(self, engine: AsyncEngine, request_ids: Sequence[str]) -> None:
        self.request_ids = list(request_ids)
        self.arrival_time = time.monotonic()
        self.scheduled_times: dict[str, float] = {}  # request id -> when it first left the waiting queue
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[list[StepOutput] | BaseException] = asyncio.Queue()
        self._pending: deque[StepOutput] = deque()
        self._unfinished = set(self.request_ids)

    @property
    def finished(self) -> bool:
        return not self._unfinished

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
        """Abort the requests that have not finished; safe to call more than once, from any state."""
        if self._unfinished:
            self._engine.abort(list(self._unfinished))
            self._unfinished.clear()

    def fail(self, exc: BaseException) -> None:
        """Abort the unfinished requests and end the iteration with ``exc`` (after outputs already delivered);
        on the event loop. The server uses it to end open responses when a shutdown runs out of time."""
        if self._unfinished:
            self._engine.abort(list(self._unfinished))
            self._queue.put_nowait(exc)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.abort()

    # ---- called on the event loop by the engine thread (call_soon_threadsafe) ----------------------------------
    def _deliver(self, outputs: list[StepOutput], scheduled: dict[str, float]) -> None:
        self.scheduled_times.update(scheduled)
        if outputs:
            self._queue.put_nowait(outputs)

    def _fail(self, exc: BaseException) -> None:
        self._queue.put_nowait(exc)


@dataclass
class _Add:
    stream: RequestStream
    requests: list[EngineRequest]
    accepted: asyncio.Future


@dataclass
class _Abort:
    request_ids: list[str]


@dataclass
class _Score:
    prompt_token_ids: list[int]
    num_top: int
    loop: asyncio.AbstractEventLoop
    result: asyncio.Future


_STOP = object()


class AsyncEngine:
    """Drive an :class:`Engine` from a background thread for asyncio callers.

    ``engine`` may be a ready Engine or a factory that builds one on the engine thread (the model loads there,
    while a server already answers ``/health`` with 503). Call :meth:`start` first and :meth:`shutdown` last.
    """

    def __init__(self, engine: Engine | Callable[[], Engine]) -> None:
        self._factory: Callable[[], Engine] = (lambda: engine) if isinstance(engine, Engine) else engine
        self._engine: Engine | None = None
        self._commands: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders _post against the thread's exit
        self._stopped = False
        self._accepting = True
        self._ready = threading.Event()
        self._idle = threading.Event()  # no request in flight
        self._idle.set()
        self._load_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._unscheduled: set[str] = set()  # engine thread only
        self._num_steps = 0
        self.stats = EngineStats()

    # ---- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread (it loads the model first when given a factory)."""
        if self._thread is not None:
            raise RuntimeError("AsyncEngine.start() was already called")
        self._thread = threading.Thread(target=self._run, name="falconlm-engine", daemon=True)
        self._thread.start()

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def is_loading(self) -> bool:
        return self._thread is not None and not self._ready.is_set()

    @property
    def is_ready(self) -> bool:
        """True once the model is loaded and the loop runs (False again after shutdown or a load failure)."""
        return self._ready.is_set() and self._engine is not None and not self._stopped

    @property
    def load_error(self) -> BaseException | None:
        return self._load_error

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until loading ended; True when the engine is ready, False on a load failure or timeout."""
        return self._ready.wait(timeout) and self.is_ready

    def shutdown(self, timeout: float = 10.0) -> None:
        """Take no new requests, let those in flight finish for up to ``timeout`` s, abort the rest, stop."""
        self._accepting = False
        if self._thread is None:
            return
        if self._ready.wait(timeout):
            self._idle.wait(timeout)
        self._post_stop()
        self._thread.join(timeout=max(timeout, 1.0))

    # ---- facts about the loaded engine (immutable, readable from any thread) ---------------------------------
    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise EngineNotReadyError("the model is still loading")
        return self._engine

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model.config.vocab_size

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the whole KV pool holds: no single request can be longer."""
        manager = self.engine.kv_cache_manager
        return manager.num_blocks * manager.block_size

    # ---- requests ---------------------------------------------------------------------------------------------
    async def add(self, requests: Sequence[EngineRequest]) -> RequestStream:
        """Add a group of requests, all or none; returns their stream once the engine thread accepted them.

        Raises what ``Engine.add_request`` raises (ValueError, QueueFullError), or an :class:`EngineError`.
        """
        self._check_accepting()
        stream = RequestStream(self, [r[0] for r in requests])
        accepted = stream._loop.create_future()
        self._post(_Add(stream, list(requests), accepted))
        try:
            await accepted
        except asyncio.CancelledError:
            stream.abort()
            raise
        return stream

    async def generate(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[StepOutput]:
        """Stream one request's outputs; a consumer that stops early aborts the request."""
        stream = await self.add([(request_id, prompt_token_ids, params)])
        async with stream:
            async for out in stream:
                yield out

    def abort(self, request_ids: str | Sequence[str]) -> None:
        """Abort requests by id (unknown or finished ids are ignored); callable from any thread."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        if ids:
            with contextlib.suppress(EngineStoppedError):  # the thread aborted everything on its way out
                self._post(_Abort(ids))

    async def prompt_logprobs(self, prompt_token_ids: Sequence[int], num_top: int) -> list[TokenLogprobs | None]:
        """Logprob of each prompt token given the ones before it (None for the first), with ``num_top`` best."""
        self._check_accepting()
        loop = asyncio.get_running_loop()
        result = loop.create_future()
        self._post(_Score(list(prompt_token_ids), num_top, loop, result))
        return await result

    def _check_accepting(self) -> None:
        if not self._accepting or self._stopped:
            raise EngineStoppedError("the server is shutting down")
        if self._load_error is not None:
            raise EngineError(f"the model failed to load: {self._load_error}")
        if not self.is_ready:
            raise EngineNotReadyError("the model is still loading")

    def _post(self, command: object) -> None:
        with self._lock:
            if self._stopped:
                raise EngineStoppedError("the engine is stopped")
            self._idle.clear()
            self._commands.put(command)

    def _post_stop(self) -> None:
        with self._lock:
            if not self._stopped:
                self._commands.put(_STOP)

    # ---- the engine thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._engine = self._factory()
        except BaseException as exc:
            if isinstance(exc, (ValueError, OSError)):  # a bad checkpoint or setting: its message says it all
                logger.error("loading the model failed: %s", exc)
            else:
                logger.exception("loading the model failed")
            self._load_error = exc
            self._finish_thread(EngineError(f"the model failed to load: {exc}"))
            return
        self._publish_stats()
        self._ready.set()
        error: EngineError = EngineStoppedError("the server shut down before the request finished")
        try:
            while self._drain_commands(block=not self._engine.has_unfinished()):
                if self._engine.has_unfinished():
                    self._step()
                self._publish_stats()
        except BaseException as exc:  # a bug in this loop: fail everyone rather than hang them
            logger.exception("the engine loop stopped")
            error = EngineError(f"the engine loop stopped: {exc}")
        self._finish_thread(error)

    def _drain_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one when ``block``); False once told to stop."""
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return True
        while True:
            if command is _STOP:
                return False
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, command: object) -> None:
        if isinstance(command, _Add):
            self._add(command)
        elif isinstance(command, _Abort):
            for request_id in command.request_ids:
                self._abort(request_id)
        elif isinstance(command, _Score):
            self._score(command)

    def _add(self, command: _Add) -> None:
        engine, added = self.engine, []
        try:
            for request_id, prompt_token_ids, params in command.requests:
                engine.add_request(request_id, prompt_token_ids, params)
                added.append(request_id)
        except Exception as exc:
            for request_id in added:
                engine.abort(request_id)
            _resolve(command.stream._loop, command.accepted, exc=exc)
            return
        for request_id in added:
            self._streams[request_id] = command.stream
            self._unscheduled.add(request_id)
        _resolve(command.stream._loop, command.accepted, result=None)

    def _abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        self._unscheduled.discard(request_id)
        if stream is None:
            return
        self.engine.abort(request_id)
        final = StepOutput(request_id, "", [], True, CompletionOutput(index=0, finish_reason="abort"))
        _call(stream._loop, stream._deliver, [final], {})

    def _score(self, command: _Score) -> None:
        try:
            value = _prompt_logprobs(self.engine, command.prompt_token_ids, command.num_top)
        except Exception as exc:
            _resolve(command.loop, command.result, exc=EngineError(f"scoring the prompt failed: {exc}"))
        else:
            _resolve(command.loop, command.result, result=value)

    def _step(self) -> None:
        engine = self.engine
        started = time.monotonic()
        try:
            outputs = engine.step()
        except Exception as exc:
            logger.exception("an engine step failed; failing the requests in flight")
            self._fail_all(EngineError(f"the engine failed while running the request: {exc}"))
            return
        self._num_steps += 1
        deliveries: dict[RequestStream, tuple[list[StepOutput], dict[str, float]]] = {}
        for request_id in list(self._unscheduled):
            request = engine.scheduler.get_request(request_id)
            if request is None or request.status != RequestStatus.WAITING:
                self._unscheduled.discard(request_id)
                stream = self._streams.get(request_id)
                if stream is not None:
                    deliveries.setdefault(stream, ([], {}))[1][request_id] = started
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            deliveries.setdefault(stream, ([], {}))[0].append(_snapshot(out))
        for stream, (items, scheduled) in deliveries.items():
            _call(stream._loop, stream._deliver, items, scheduled)

    def _fail_all(self, error: EngineError) -> None:
        """Abort every request in flight and fail its stream with ``error``."""
        streams = set(self._streams.values())
        for request_id in list(self._streams):
            try:
                self.engine.abort(request_id)
            except Exception:
                logger.exception("aborting %s after an engine failure failed", request_id)
        self._streams.clear()
        self._unscheduled.clear()
        for stream in streams:
            _call(stream._loop, stream._fail, error)

    def _publish_stats(self) -> None:
        engine = self.engine
        manager = engine.kv_cache_manager
        self.stats = EngineStats(
            num_running=engine.scheduler.num_running,
            num_waiting=engine.scheduler.num_waiting,
            num_blocks=manager.num_blocks,
            num_free_blocks=manager.num_free_blocks,
            num_prefix_query_tokens=manager.num_prefix_queries_tokens,
            num_prefix_hit_tokens=manager.num_prefix_hit_tokens,
            num_preemptions=engine.scheduler.num_preemptions,
            num_steps=self._num_steps,
        )
        if not self._streams and self._commands.empty():
            self._idle.set()

    def _finish_thread(self, error: EngineError) -> None:
        """Stop taking commands, fail what is in flight or queued, and wake anyone waiting on us."""
        with self._lock:
            self._stopped = True
        if self._engine is not None:
            self._fail_all(error)
            self._publish_stats()
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Add):
                _resolve(command.stream._loop, command.accepted, exc=error)
            elif isinstance(command, _Score):
                _resolve(command.loop, command.result, exc=error)
        self._idle.set()
        self._ready.set()


def _snapshot(out: StepOutput) -> StepOutput:
    """A copy the event loop may read while the engine thread goes on mutating the live CompletionOutput."""
    live = out.output
    output = replace(
        live, token_ids=list(live.token_ids), logprobs=None if live.logprobs is None else list(live.logprobs)
    )
    return replace(out, token_ids=list(out.token_ids), output=output)


def _call(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: object) -> None:
    """``loop.call_soon_threadsafe`` that tolerates a loop already closed (its caller is gone)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def _resolve(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future, result: object = None, exc: BaseException | None = None
) -> None:
    def settle() -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    _call(loop, settle)


@torch.inference_mode()
def _prompt_logprobs(engine: Engine, prompt_token_ids: list[int], num_top: int) -> list[TokenLogprobs | None]:
    """One dense forward over the prompt; logprobs from the raw logits, like the sampler's."""
    model = engine.model
    device = model.transformer.ln_f.weight.device
    ids = torch.tensor([prompt_token_ids], device=device)  # [1, T]
    logprobs = torch.log_softmax(model(ids)[0, :-1].float(), dim=-1)  # [T-1, V]
    targets = ids[0, 1:]
    chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
    top_values, top_ids = logprobs.topk(num_top, dim=-1) if num_top else (logprobs[:, :0], logprobs[:, :0])
    top_values, top_ids = top_values.tolist(), top_ids.long().tolist()
    result: list[TokenLogprobs | None] = [None]
    for i, token_id in enumerate(prompt_token_ids[1:]):
        result.append(TokenLogprobs(token_id, chosen[i], list(zip(top_ids[i], top_values[i], strict=True))))
    return result
