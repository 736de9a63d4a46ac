"""The batch runner: ingest a JSONL file into the store, run its pending requests on the engine, finalize.

Resumable and exactly-once: the store is the only record of progress. Ingesting commits input lines with
the file offset after them; running takes pending rows in input order with at most ``max_in_flight`` in the
engine (and not yet committed), and commits finished results in batches, one transaction each. A crash
anywhere loses only uncommitted results, which the next run recomputes; a replayed result for a request
already done is dropped by the store. Finalizing writes the output and error files from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..engine.async_engine import AsyncEngine
from ..serving.metrics import ServerMetrics
from ..serving.settings import ServerSettings
from .execute import LeftPending, RequestExecutor, failed
from .ingest import ingest
from .jsonl import COMPLETIONS
from .records import Job, PendingRequest, Result
from .store import Store

logger = logging.getLogger(__name__)

PAGE_SIZE = 256
CANCEL_POLL_S = 0.5

Finalizer = Callable[[Job, bool], dict[str, Any]]  # (job, cancelled) -> job columns to set (file ids ...)


class BatchRunner:
    """Runs jobs of one store on an :class:`AsyncEngine`, each request through :class:`RequestExecutor` (which
    explains ``engine``, ``metrics`` and ``ignore_body_model``)."""

    def __init__(
        self,
        store: Store,
        engine: AsyncEngine | Callable[[], AsyncEngine],
        settings: ServerSettings,
        max_in_flight: int = 32,
        on_progress: Callable[[int, int], None] | None = None,
        metrics: ServerMetrics | None = None,
        ignore_body_model: bool = False,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.store = store
        self.settings = settings
        self.max_in_flight = max_in_flight
        self.on_progress = on_progress
        self.executor = RequestExecutor(engine, settings, metrics, ignore_body_model)
        self._cancel = asyncio.Event()
        self._halt = False  # the run is being stopped (not cancelled): threads check it
        self._engine_stopped = False

    def cancel(self) -> None:
        """Wake the run after the job's cancel flag was set in the store (other processes are polled)."""
        self._cancel.set()

    async def run(self, job_id: str, input_path: Path | None, finalize: Finalizer) -> Job:
        """Take a job from wherever it stands to a final status; returns early (job still active) when the
        engine stops. Cancelling the calling task stops it too, with every finished result committed."""
        self._cancel.clear()
        self._halt, self._engine_stopped = False, False
        job = self._job(job_id)
        if job.status == "validating" and not job.cancel_requested:
            if input_path is None or not input_path.is_file():
                return self.store.set_status(job.id, "failed", errors=_errors("file_not_found", "the input is gone"))

            def should_stop() -> bool:
                return self._halt or self._cancel.is_set() or self.store.cancel_requested(job_id)

            try:
                finished = await asyncio.to_thread(ingest, self.store, job, input_path, should_stop)
            except asyncio.CancelledError:
                self._halt = True  # the thread stops after its current chunk
                raise
            job = self._job(job_id)
            if finished and not job.cancel_requested:
                job = self.store.set_status(job.id, "in_progress")
        if job.status == "in_progress" and not job.cancel_requested:
            if job.pending:
                await self._process(job)
                job = self._job(job_id)
            if not job.cancel_requested and job.pending == 0:
                job = self.store.set_status(job.id, "finalizing")
        if job.status == "cancelling" or (job.is_active and job.cancel_requested):
            extra = await asyncio.to_thread(finalize, job, True)
            return self.store.set_status(job.id, "cancelled", **extra)
        if job.status == "finalizing":
            extra = await asyncio.to_thread(finalize, job, False)
            return self.store.set_status(job.id, "completed", **extra)
        return job

    def _job(self, job_id: str) -> Job:
        job = self.store.get_job(job_id)
        if job is None:
            raise KeyError(f"no batch job {job_id!r}")
        return job

    async def _process(self, job: Job) -> None:
        """Run every pending request; returns when none is left, on cancel, or when the engine stops."""
        self.executor.serving(COMPLETIONS)  # the engine (and model) now, before the first request needs it
        results: asyncio.Queue[Result | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.max_in_flight)  # a slot is freed once its result is committed
        committer = asyncio.create_task(self._commit_loop(job.id, results, slots))
        feeder = asyncio.create_task(self._feed(job.id, results, slots, committer))
        watcher = asyncio.create_task(self._watch_cancel(job.id))
        try:
            await asyncio.wait([feeder, watcher, committer], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (feeder, watcher):
                task.cancel()
            await asyncio.gather(feeder, watcher, return_exceptions=True)
            results.put_nowait(None)
            await asyncio.shield(committer)  # finished results are committed, even when stopping
        if feeder.done() and not feeder.cancelled() and feeder.exception() is not None:
            raise feeder.exception()  # type: ignore[misc]

    async def _watch_cancel(self, job_id: str) -> None:
        while not self._cancel.is_set():
            if await asyncio.to_thread(self.store.cancel_requested, job_id):
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._cancel.wait(), CANCEL_POLL_S)

    async def _feed(
        self, job_id: str, results: asyncio.Queue[Result | None], slots: asyncio.Semaphore, committer: asyncio.Task
    ) -> None:
        tasks: set[asyncio.Task] = set()
        try:
            after = 0
            while not self._engine_stopped:
                rows = await asyncio.to_thread(self.store.pending, job_id, after, PAGE_SIZE)
                if not rows:
                    break
                for row in rows:
                    await slots.acquire()
                    if self._engine_stopped:
                        break
                    if committer.done():
                        raise RuntimeError("committing results failed") from committer.exception()
                    task = asyncio.create_task(self._one(row, results, slots))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                after = rows[-1].line_no
            while tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, row: PendingRequest, results: asyncio.Queue[Result | None], slots: asyncio.Semaphore) -> None:
        try:
            result = await self.executor.execute(row)
        except LeftPending as exc:
            self._engine_stopped = self._engine_stopped or exc.engine_stopped
            slots.release()
            return
        except asyncio.CancelledError:
            slots.release()
            raise
        except Exception as exc:  # a bug: answer the request with a server error rather than hang the job
            logger.exception("batch request %r failed unexpectedly", row.custom_id)
            result = failed(row.custom_id, "internal_error", f"internal error: {exc}")
        results.put_nowait(result)

    async def _commit_loop(self, job_id: str, results: asyncio.Queue[Result | None], slots: asyncio.Semaphore) -> None:
        stop = False
        while not stop:
            batch = [await results.get()]
            while not results.empty():
                batch.append(results.get_nowait())
            stop = None in batch
            items = [r for r in batch if r is not None]
            if items:
                await asyncio.to_thread(self.store.commit_results, job_id, items)
                for _ in items:
                    slots.release()
                if self.on_progress is not None:
                    self.on_progress(len(items), sum(r.completion_tokens for r in items))


def _errors(code: str, message: str) -> str:
    return json.dumps({"object": "list", "data": [{"code": code, "message": message, "param": None, "line": None}]})
