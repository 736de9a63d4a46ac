"""AsyncEngine: one background thread owns the Engine and runs its step loop; asyncio code streams the outputs.

Every Engine call happens on that thread. Callers post commands (add, abort, stop) to a thread-safe queue that
the thread drains between steps; with nothing queued and nothing unfinished it blocks on that queue, so an idle
engine uses no CPU. Outputs go back to each caller's :class:`RequestStream` through ``loop.call_soon_threadsafe``.
Statistics are the engine's own ``stats()``, published after every step before its outputs go out (a client that
has a token sees the state that made it) and after each round of commands; scheduling times and prompt logprobs
travel on the outputs, so the thread never inspects the scheduler nor runs the model itself.

A caller that stops iterating (client gone: ``GeneratorExit`` or ``CancelledError``) aborts its requests; the
abort is applied before the next step, so their KV blocks are free within one step. A failing step fails the
requests in flight with :class:`EngineError` (they cannot hang) and the loop goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from .engine import Engine, StepOutput
from .errors import EngineError, EngineNotReadyError, EngineStoppedError
from .outputs import CompletionOutput
from .parallel_sampling import sequence_ids
from .request_stream import RequestStream, call_threadsafe, resolve_threadsafe, snapshot
from .sampling_params import SamplingParams
from .stats import EngineStats
from .tp_runner import TensorParallelError

__all__ = [
    "AsyncEngine",
    "EngineError",
    "EngineNotReadyError",
    "EngineRequest",
    "EngineStats",
    "EngineStoppedError",
    "RequestStream",
]

logger = logging.getLogger(__name__)

EngineRequest = tuple[str, Sequence[int], SamplingParams]  # (request_id, prompt_token_ids, params)


@dataclass
class _Add:
    stream: RequestStream
    requests: list[EngineRequest]
    accepted: asyncio.Future


@dataclass
class _Abort:
    request_ids: list[str]


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
        self.fatal_error: BaseException | None = None  # why the loop stopped on its own (a tensor-parallel rank died)
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self._streams: dict[str, RequestStream] = {}  # sequence id -> its stream; engine thread only
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

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Block until the engine thread has ended (shut down, failed to load, or stopped on its own)."""
        return self._finished.wait(timeout)

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
    def validator(self):
        """The engine's request validator (its vocabulary, context and KV-pool limits)."""
        return self.engine.validator

    @property
    def vocab_size(self) -> int:
        return self.validator.vocab_size

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the whole KV pool holds: no single request can be longer."""
        return self.validator.kv_capacity_tokens

    # ---- requests ---------------------------------------------------------------------------------------------
    async def add(self, requests: Sequence[EngineRequest]) -> RequestStream:
        """Add a group of requests, all or none; returns their stream once the engine thread accepted them.

        A request with n > 1 streams one sequence per child. Raises what ``Engine.add_request`` raises
        (ValueError, QueueFullError), or an :class:`EngineError`.
        """
        self._check_accepting()
        stream = RequestStream(self, [i for rid, _, sp in requests for i in sequence_ids(rid, sp.n)])
        accepted = stream.loop.create_future()
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
        driver = getattr(self._engine, "parallel_driver", None)  # tensor parallel: followers need a message often
        try:
            while self._drain_commands(block=not self._engine.has_unfinished()):
                if self._engine.has_unfinished():
                    self._step()
                self._publish_stats()
                if driver is not None:
                    driver.tick()
        except TensorParallelError as exc:  # a rank died: the group cannot run another step
            logger.error("%s", exc)
            self.fatal_error = exc
            error = EngineError(f"the engine stopped: {exc}")
        except BaseException as exc:  # a bug in this loop: fail everyone rather than hang them
            logger.exception("the engine loop stopped")
            error = EngineError(f"the engine loop stopped: {exc}")
        self._finish_thread(error)

    def _drain_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one when ``block``); False once told to stop."""
        driver = getattr(self._engine, "parallel_driver", None)
        try:
            command = self._commands.get(block=block, timeout=driver.keepalive_interval_s if driver and block else None)
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

    def _add(self, command: _Add) -> None:
        engine, added = self.engine, []
        try:
            for request_id, prompt_token_ids, params in command.requests:
                added += engine.add_request(request_id, prompt_token_ids, params)
        except Exception as exc:
            for sequence_id in added:
                engine.abort(sequence_id)
            resolve_threadsafe(command.stream.loop, command.accepted, exc=exc)
            return
        for sequence_id in added:
            self._streams[sequence_id] = command.stream
        resolve_threadsafe(command.stream.loop, command.accepted, result=None)

    def _abort(self, request_id: str) -> None:
        """Abort a sequence, or every sequence of a parent id, and end each one's stream."""
        for sequence_id in self.engine.sequence_ids(request_id):
            stream = self._streams.pop(sequence_id, None)
            if stream is not None:
                self.engine.abort(sequence_id)
                final = CompletionOutput(index=0, finish_reason="abort")
                call_threadsafe(stream.loop, stream._deliver, [StepOutput(sequence_id, "", [], True, final)])

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except TensorParallelError:
            raise
        except Exception as exc:
            driver = getattr(self._engine, "parallel_driver", None)
            if driver is not None:  # e.g. a collective inside the model failed: the ranks are out of step for good
                driver.fail()
                raise TensorParallelError(f"a tensor-parallel step failed on rank 0: {exc}") from exc
            logger.exception("an engine step failed; failing the requests in flight")
            self._fail_all(EngineError(f"the engine failed while running the request: {exc}"))
            return
        self._publish_stats()  # before the outputs go out: whoever reads them sees the state that made them
        deliveries: dict[RequestStream, list[StepOutput]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            deliveries.setdefault(stream, []).append(snapshot(out))
        for stream, items in deliveries.items():
            call_threadsafe(stream.loop, stream._deliver, items)

    def _fail_all(self, error: EngineError) -> None:
        """Abort every request in flight and fail its stream with ``error``."""
        streams = set(self._streams.values())
        for request_id in list(self._streams):
            try:
                self.engine.abort(request_id)
            except Exception:
                logger.exception("aborting %s after an engine failure failed", request_id)
        self._streams.clear()
        for stream in streams:
            call_threadsafe(stream.loop, stream._fail, error)

    def _publish_stats(self) -> None:
        self.stats = self.engine.stats()
        if not self._streams and self._commands.empty():
            self._idle.set()

    def _finish_thread(self, error: EngineError) -> None:
        """Stop taking commands, fail what is in flight or queued, and wake anyone waiting on us."""
        with self._lock:
            self._stopped = True
        if self._engine is not None:
            self._fail_all(error)
            self._publish_stats()
            try:
                if hasattr(self._engine, "close"):
                    self._engine.close()
            except TensorParallelError as exc:
                logger.error("%s", exc)
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Add):
                resolve_threadsafe(command.stream.loop, command.accepted, exc=error)
        self._idle.set()
        self._ready.set()
        self._finished.set()
