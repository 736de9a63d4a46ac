"""The OpenAI Files and Batches API over a state directory, without HTTP: files and batches as OpenAI objects.

:class:`BatchService` owns the store and a worker task that runs batches one at a time, oldest first, on the
server's AsyncEngine; on start it resumes every unfinished batch. An uploaded file is copied into the state
directory (atomically) after a per-file limit and a quota for the whole directory (both answered with 413);
every id is random and checked against its pattern before it names a path. Errors are raised as APIError.
``falconlm.batch.routes`` puts this on HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, BinaryIO

from ..engine.async_engine import AsyncEngine
from ..serving.errors import APIError, bad_request
from ..serving.metrics import ServerMetrics
from ..serving.settings import ServerSettings
from .atomic import atomic_write, temp_path
from .jsonl import ENDPOINTS, new_id
from .outputs import write_jsonl
from .protocol import BatchList, BatchObject, BatchRequestCounts, FileList, FileObject
from .records import ACTIVE, FileRecord, Job
from .runner import BatchRunner
from .store import BATCH_ID, FILE_ID, FINAL, StateLock, Store

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 200 * 1024 * 1024  # OpenAI's limit for a batch input file
COMPLETION_WINDOW_S = 24 * 3600
MAX_METADATA_PAIRS = 16


class BatchService:
    """Files and batches of one state directory, run on ``engine`` (which the server starts and stops)."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        engine: AsyncEngine,
        settings: ServerSettings,
        metrics: ServerMetrics | None = None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        max_in_flight: int = 32,
    ) -> None:
        if max_upload_bytes < 1:
            raise ValueError(f"max_upload_bytes must be >= 1, got {max_upload_bytes}")
        self.state_dir = Path(state_dir)
        self.engine = engine
        self.settings = settings
        self.max_upload_bytes = max_upload_bytes
        self.max_state_bytes = settings.max_state_bytes
        self.store: Store | None = None
        self._uploading = 0  # bytes of uploads in flight, counted against the quota
        self._lock = StateLock(self.state_dir)
        self._metrics = metrics
        self._max_in_flight = max_in_flight
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._worker: asyncio.Task | None = None
        self._runner: BatchRunner | None = None
        self._current: str | None = None

    # ---- lifecycle --------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the store (refusing a state directory another process runs), queue unfinished batches."""
        store = Store(self.state_dir)
        if not self._lock.acquire():
            store.close()
            raise RuntimeError(f"another falconlm process (pid {self._lock.holder()}) uses {self.state_dir}")
        self.store = store
        for stale in store.files_dir.glob(temp_path(Path("*")).name):  # left by a crash
            stale.unlink(missing_ok=True)
        self._runner = BatchRunner(store, self.engine, self.settings, self._max_in_flight, metrics=self._metrics)
        for job in reversed(store.list_jobs("api")):  # oldest first
            if job.is_active:
                self._queue.put_nowait(job.id)
        self._worker = asyncio.create_task(self._work(), name="falconlm-batches")

    async def stop(self) -> None:
        """Stop the worker (finished results are committed; the rest resumes on the next start)."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        if self.store is not None:
            self.store.close()
            self.store = None
        self._lock.release()

    def _store(self) -> Store:
        if self.store is None:
            raise APIError(503, "the batch service is not running")
        return self.store

    async def _work(self) -> None:
        while not self.engine.is_ready:
            if self.engine.load_error is not None:
                logger.error("batches will not run: the model failed to load")
                return
            await asyncio.sleep(0.2)
        store, runner = self._store(), self._runner
        assert runner is not None
        while True:
            job_id = await self._queue.get()
            job = store.get_job(job_id)
            if job is None or not job.is_active:
                continue
            self._current = job_id
            try:
                job = await runner.run(job_id, self._input_path(job), self._finalize)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.exception("batch %s failed", job_id)
                store.set_status(job_id, "failed", errors=_batch_errors("internal_error", str(exc)))
                continue
            finally:
                self._current = None
            if job.is_active:  # requests were left pending
                if not self.engine.is_ready:
                    return  # the engine is stopping: the next start resumes the batch
                self._queue.put_nowait(job_id)
                await asyncio.sleep(1.0)

    def _input_path(self, job: Job) -> Path | None:
        store = self._store()
        if job.input_file_id is None or store.get_file(job.input_file_id) is None:
            return None
        return store.file_path(job.input_file_id)

    def _finalize(self, job: Job, cancelled: bool) -> dict[str, Any]:
        """Write the output and error files (ids chosen when the batch was created, so reruns overwrite)."""
        store = self._store()
        ids = job.option
        out_id, err_id = ids["output_file_id"], ids["error_file_id"]
        now = int(time.time())
        out_path, err_path = store.file_path(out_id), store.file_path(err_id)
        write_jsonl(out_path, store.iter_output(job.id))
        store.add_file(FileRecord(out_id, "batch_output", f"{job.id}_output.jsonl", out_path.stat().st_size, now))
        if write_jsonl(err_path, store.iter_errors(job.id, cancelled)) == 0:
            store.delete_file(err_id)
            return {"output_file_id": out_id, "error_file_id": None}
        store.add_file(FileRecord(err_id, "batch_output", f"{job.id}_error.jsonl", err_path.stat().st_size, now))
        return {"output_file_id": out_id, "error_file_id": err_id}

    # ---- files ------------------------------------------------------------------------------------------------
    async def add_file(
        self, purpose: str | None, filename: str | None, content: BinaryIO | None, size: int
    ) -> FileObject:
        """``POST /v1/files``: ``content`` (``size`` bytes, read from its start) becomes a file of purpose "batch"."""
        store = self._store()
        if purpose != "batch":
            raise bad_request(f"purpose must be 'batch', got {purpose!r}", "purpose")
        if content is None:
            raise bad_request("the form has no 'file' part", "file")
        if size > self.max_upload_bytes:
            raise APIError(413, f"the file is over the upload limit of {self.max_upload_bytes} bytes")
        used = await asyncio.to_thread(store.used_bytes)
        room = self.max_state_bytes - used - self._uploading
        if room <= 0 or size > room:
            raise self._quota_error(used)
        file_id = new_id("file-")
        self._uploading += size  # counted against the quota until the store counts it
        try:
            await asyncio.to_thread(_copy_file, content, store.file_path(file_id))
        finally:
            self._uploading -= size
        record = FileRecord(file_id, "batch", _safe_filename(filename), size, int(time.time()))
        store.add_file(record)
        return file_object(record)

    def _quota_error(self, used: int) -> APIError:
        return APIError(
            413,
            f"the server's file storage quota of {self.max_state_bytes} bytes would be exceeded ({used} bytes "
            "stored); delete files you no longer need with DELETE /v1/files/{file_id}",
            "file",
            "quota_exceeded",
        )

    def list_files(self, purpose: str | None, limit: int) -> FileList:
        records = self._store().list_files(purpose, max(1, min(limit, 10000)))
        return FileList(data=[file_object(r) for r in records], has_more=False)

    def file_content_path(self, file_id: str) -> Path:
        return self._store().file_path(self.get_file(file_id).id)

    def get_file(self, file_id: str) -> FileRecord:
        record = self._store().get_file(file_id) if FILE_ID.match(file_id) else None
        if record is None:
            raise APIError(404, f"no file with id {file_id!r}", "file_id", "not_found")
        return record

    def delete_file(self, file_id: str) -> None:
        store = self._store()
        self.get_file(file_id)
        for job in store.list_jobs("api"):
            if job.is_active and job.input_file_id == file_id:
                raise bad_request(f"file {file_id} is the input of batch {job.id}, which is still running", "file_id")
        store.delete_file(file_id)

    # ---- batches ----------------------------------------------------------------------------------------------
    def create_batch(self, body: dict[str, Any]) -> Job:
        store = self._store()
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str):
            raise bad_request("input_file_id is required", "input_file_id")
        record = store.get_file(file_id) if FILE_ID.match(file_id) else None
        if record is None or record.purpose != "batch":
            raise bad_request(f"no batch input file with id {file_id!r}", "input_file_id")
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise bad_request(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}", "endpoint")
        window = body.get("completion_window")
        if window != "24h":
            raise bad_request(f"completion_window must be '24h', got {window!r}", "completion_window")
        metadata = _check_metadata(body.get("metadata"))
        options = {"output_file_id": new_id("file-"), "error_file_id": new_id("file-")}
        job = store.create_job(
            new_id("batch_"),
            "api",
            file_id,
            input_file_id=file_id,
            endpoint=endpoint,
            completion_window=window,
            metadata=None if metadata is None else json.dumps(metadata),
            options=json.dumps(options),
        )
        self._queue.put_nowait(job.id)
        return job

    def get_batch(self, batch_id: str) -> Job:
        job = self._store().get_job(batch_id) if BATCH_ID.match(batch_id) else None
        if job is None or job.source != "api":
            raise APIError(404, f"no batch with id {batch_id!r}", "batch_id", "not_found")
        return job

    async def cancel_batch(self, batch_id: str) -> Job:
        store = self._store()
        job = self.get_batch(batch_id)
        if job.status in FINAL and job.status != "cancelled":
            raise bad_request(f"batch {batch_id} is already {job.status}", "batch_id")
        if job.status in ACTIVE and job.status != "cancelling":
            job = store.request_cancel(batch_id) or job
        if self._current == batch_id and self._runner is not None:
            self._runner.cancel()  # the worker writes the files within a moment
        elif job.status == "cancelling":  # queued, not running: finish the cancel here
            extra = await asyncio.to_thread(self._finalize, job, True)
            job = store.set_status(batch_id, "cancelled", **extra)
        return job

    def list_batches(self, after: str | None, limit: int) -> BatchList:
        limit = max(1, min(limit, 100))
        before = self.get_batch(after).seq if after else None
        jobs = self._store().list_jobs("api", before, limit + 1)
        data = [self.batch_object(j) for j in jobs[:limit]]
        first, last = (data[0].id, data[-1].id) if data else (None, None)
        return BatchList(data=data, first_id=first, last_id=last, has_more=len(jobs) > limit)

    def batch_object(self, job: Job) -> BatchObject:
        """The OpenAI ``batch`` object for a job."""
        return BatchObject(
            id=job.id,
            endpoint=job.endpoint,
            model=self.settings.model_name,
            errors=json.loads(job.errors) if job.errors else None,
            input_file_id=job.input_file_id,
            completion_window=job.completion_window,
            status=job.status,
            output_file_id=job.output_file_id,
            error_file_id=job.error_file_id,
            created_at=job.created_at,
            in_progress_at=job.in_progress_at,
            expires_at=job.created_at + COMPLETION_WINDOW_S,
            finalizing_at=job.finalizing_at,
            completed_at=job.completed_at,
            failed_at=job.failed_at,
            expired_at=None,
            cancelling_at=job.cancelling_at,
            cancelled_at=job.cancelled_at,
            request_counts=BatchRequestCounts(total=job.total, completed=job.completed, failed=job.failed),
            metadata=json.loads(job.metadata) if job.metadata else None,
            usage={
                "input_tokens": job.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": job.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": job.prompt_tokens + job.completion_tokens,
            },
        )


# ---- helpers ----------------------------------------------------------------------------------------------------


def file_object(record: FileRecord) -> FileObject:
    """The OpenAI ``file`` object for a stored file."""
    return FileObject(
        id=record.id,
        bytes=record.bytes,
        created_at=record.created_at,
        filename=record.filename,
        purpose=record.purpose,
        status="processed",
        status_details=None,
        expires_at=None,
    )


def _check_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA_PAIRS:
        raise bad_request(f"metadata must be an object of at most {MAX_METADATA_PAIRS} pairs", "metadata")
    for key, value in metadata.items():
        if len(key) > 64 or not isinstance(value, str) or len(value) > 512:
            raise bad_request("metadata keys are at most 64 characters, values strings of at most 512", "metadata")
    return metadata


def _safe_filename(name: str | None) -> str:
    """The client's file name as metadata only: last path part, printable, at most 255 characters."""
    base = re.split(r"[\\/]", name or "")[-1]
    cleaned = "".join(ch for ch in base if ch.isprintable())[:255]
    return cleaned or "upload.jsonl"


def _copy_file(content: BinaryIO, dest: Path) -> None:
    """Copy ``content`` from its start to ``dest``, atomically."""
    content.seek(0)
    with atomic_write(dest, "wb") as out:
        shutil.copyfileobj(content, out, 1 << 20)


def _batch_errors(code: str, message: str) -> str:
    return json.dumps({"object": "list", "data": [{"code": code, "message": message, "param": None, "line": None}]})
