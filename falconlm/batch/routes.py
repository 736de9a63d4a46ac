"""The OpenAI Files and Batches API over a state directory: ``/v1/files`` and ``/v1/batches``.

:class:`BatchService` owns the store and a worker task that runs batches one at a time, oldest first, on the
server's AsyncEngine; on start it resumes every unfinished batch. Uploads stream to disk under the state
directory (never held in memory) with a per-file limit and a quota for the whole directory (both answered
with 413); every id is random and checked against its pattern before it names a path.
``build_batch_router(service)`` is the router, which an app includes (``falconlm.cli.serve_http``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.responses import Response

from ..engine.async_engine import AsyncEngine
from ..serving.errors import APIError, bad_request
from ..serving.json_body import parse_json
from ..serving.metrics import ServerMetrics
from ..serving.settings import ServerSettings
from .jsonl import ENDPOINTS, new_id
from .outputs import write_jsonl
from .runner import BatchRunner
from .store import ACTIVE, BATCH_ID, FILE_ID, FINAL, FileRecord, Job, StateLock, Store

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 200 * 1024 * 1024  # OpenAI's limit for a batch input file
COMPLETION_WINDOW_S = 24 * 3600
MAX_METADATA_PAIRS = 16
_PART_HEADER_LIMIT = 16 * 1024
_FIELD_LIMIT = 4096


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
        self._tmp_dir.mkdir(mode=0o700, exist_ok=True)
        for stale in [*self._tmp_dir.iterdir(), *store.files_dir.glob(".*.tmp")]:  # left by a crash
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

    @property
    def _tmp_dir(self) -> Path:
        return self.state_dir / "tmp"

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
    async def upload(self, request: Request) -> FileRecord:
        """``POST /v1/files`` (multipart: ``purpose`` and ``file``), streamed to disk."""
        store = self._store()
        boundary = _boundary(request.headers.get("content-type", ""))
        used = await asyncio.to_thread(store.used_bytes)
        room = self.max_state_bytes - used - self._uploading
        if room <= 0:
            raise self._quota_error(used)
        limit = self.max_upload_bytes + _PART_HEADER_LIMIT
        raw = self._tmp_dir / f"upload-{secrets.token_hex(8)}"
        size = 0
        try:
            try:
                with open(raw, "wb") as f:
                    async for chunk in request.stream():
                        size += len(chunk)
                        self._uploading += len(chunk)
                        if size > limit:
                            raise APIError(413, f"the file is over the upload limit of {self.max_upload_bytes} bytes")
                        if size > room + _PART_HEADER_LIMIT:
                            raise self._quota_error(used)
                        f.write(chunk)
            finally:
                self._uploading -= size
            fields, part = await asyncio.to_thread(_parse_multipart, raw, boundary)
            purpose = fields.get("purpose")
            if purpose != "batch":
                raise bad_request(f"purpose must be 'batch', got {purpose!r}", "purpose")
            if part is None:
                raise bad_request("the form has no 'file' part", "file")
            filename, start, end = part
            if end - start > self.max_upload_bytes:
                raise APIError(413, f"the file is over the upload limit of {self.max_upload_bytes} bytes")
            if end - start > room:
                raise self._quota_error(used)
            file_id = new_id("file-")
            await asyncio.to_thread(_copy_range, raw, start, end, store.file_path(file_id))
        finally:
            raw.unlink(missing_ok=True)
        record = FileRecord(file_id, "batch", _safe_filename(filename), end - start, int(time.time()))
        store.add_file(record)
        return record

    def _quota_error(self, used: int) -> APIError:
        return APIError(
            413,
            f"the server's file storage quota of {self.max_state_bytes} bytes would be exceeded ({used} bytes "
            "stored); delete files you no longer need with DELETE /v1/files/{file_id}",
            "file",
            "quota_exceeded",
        )

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

    def batch_object(self, job: Job) -> dict[str, Any]:
        """The OpenAI ``batch`` object for a job."""
        return {
            "id": job.id,
            "object": "batch",
            "endpoint": job.endpoint,
            "model": self.settings.model_name,
            "errors": json.loads(job.errors) if job.errors else None,
            "input_file_id": job.input_file_id,
            "completion_window": job.completion_window,
            "status": job.status,
            "output_file_id": job.output_file_id,
            "error_file_id": job.error_file_id,
            "created_at": job.created_at,
            "in_progress_at": job.in_progress_at,
            "expires_at": job.created_at + COMPLETION_WINDOW_S,
            "finalizing_at": job.finalizing_at,
            "completed_at": job.completed_at,
            "failed_at": job.failed_at,
            "expired_at": None,
            "cancelling_at": job.cancelling_at,
            "cancelled_at": job.cancelled_at,
            "request_counts": {"total": job.total, "completed": job.completed, "failed": job.failed},
            "metadata": json.loads(job.metadata) if job.metadata else None,
            "usage": {
                "input_tokens": job.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": job.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": job.prompt_tokens + job.completion_tokens,
            },
        }


def build_batch_router(service: BatchService) -> APIRouter:
    """``/v1/files`` and ``/v1/batches``; errors are raised as APIError (OpenAI error objects). The service runs
    inside the lifespan of the app that includes the router (after its engine starts, stopping before it stops)."""

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    router = APIRouter(lifespan=lifespan)

    @router.post("/v1/files")
    async def upload_file(request: Request) -> Response:
        return JSONResponse(_file_object(await service.upload(request)))

    @router.get("/v1/files")
    async def list_files(purpose: str | None = None, limit: int = 10000) -> Response:
        records = service._store().list_files(purpose, max(1, min(limit, 10000)))
        return JSONResponse({"object": "list", "data": [_file_object(r) for r in records], "has_more": False})

    @router.get("/v1/files/{file_id}")
    async def get_file(file_id: str) -> Response:
        return JSONResponse(_file_object(service.get_file(file_id)))

    @router.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str) -> Response:
        record = service.get_file(file_id)
        return FileResponse(service._store().file_path(record.id), media_type="application/octet-stream")

    @router.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str) -> Response:
        service.delete_file(file_id)
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    @router.post("/v1/batches")
    async def create_batch(request: Request) -> Response:
        return JSONResponse(service.batch_object(service.create_batch(await _json_object(request))))

    @router.get("/v1/batches")
    async def list_batches(after: str | None = None, limit: int = 20) -> Response:
        limit = max(1, min(limit, 100))
        before = service.get_batch(after).seq if after else None
        jobs = service._store().list_jobs("api", before, limit + 1)
        data = [service.batch_object(j) for j in jobs[:limit]]
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": len(jobs) > limit,
            }
        )

    @router.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str) -> Response:
        return JSONResponse(service.batch_object(service.get_batch(batch_id)))

    @router.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str) -> Response:
        return JSONResponse(service.batch_object(await service.cancel_batch(batch_id)))

    return router


# ---- helpers ----------------------------------------------------------------------------------------------------


def _file_object(record: FileRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": record.created_at,
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


async def _json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object; 400 for bad JSON, deep nesting or lone surrogates (the server's checks)."""
    return parse_json(await request.body())


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


def _boundary(content_type: str) -> bytes:
    kind, _, params = content_type.partition(";")
    match = re.search(r'boundary="?([^";]+)"?', params)
    if kind.strip().lower() != "multipart/form-data" or match is None:
        raise bad_request("upload the file as multipart/form-data with fields 'purpose' and 'file'")
    return match.group(1).encode("latin-1")


def _find_all(path: Path, needle: bytes, chunk_size: int = 1 << 20) -> list[int]:
    """Every offset of ``needle`` in the file, reading it in chunks."""
    found, overlap, base = [], len(needle) - 1, 0
    tail = b""
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            data = tail + chunk
            start = 0
            while (i := data.find(needle, start)) != -1:
                found.append(base - len(tail) + i)
                start = i + 1
            tail = data[-overlap:] if overlap else b""
            base += len(chunk)
    return found


def _parse_multipart(path: Path, boundary: bytes) -> tuple[dict[str, str], tuple[str | None, int, int] | None]:
    """(small text fields, the 'file' part as (filename, start, end)) of a multipart body saved at ``path``."""
    with open(path, "rb") as f:
        head = f.read(len(boundary) + 2)
    delimiters = _find_all(path, b"\r\n--" + boundary)
    starts = [(p, p + len(boundary) + 4) for p in delimiters]
    if head == b"--" + boundary:
        starts.insert(0, (0, len(boundary) + 2))
    if len(starts) < 2:
        raise bad_request("the multipart body is malformed (no complete part)")
    fields: dict[str, str] = {}
    file_part = None
    with open(path, "rb") as f:
        for (_, after), (next_delim, _) in itertools.pairwise(starts):
            f.seek(after)
            block = f.read(_PART_HEADER_LIMIT)
            if block.startswith(b"--"):
                break  # the closing delimiter
            header_end = block.find(b"\r\n\r\n")
            if not block.startswith(b"\r\n") or header_end == -1:
                raise bad_request("the multipart body is malformed (part headers)")
            headers = block[2:header_end].decode("utf-8", "replace")
            body_start = after + header_end + 4
            name, filename = _disposition(headers)
            if name == "file":
                file_part = (filename, body_start, next_delim)
            elif name is not None and next_delim - body_start <= _FIELD_LIMIT:
                f.seek(body_start)
                fields[name] = f.read(next_delim - body_start).decode("utf-8", "replace")
    return fields, file_part


def _disposition(headers: str) -> tuple[str | None, str | None]:
    for line in headers.split("\r\n"):
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-disposition":
            name = re.search(r'(?:^|;)\s*name="([^"]*)"', value)
            filename = re.search(r'(?:^|;)\s*filename="([^"]*)"', value)
            return (name.group(1) if name else None, filename.group(1) if filename else None)
    return None, None


def _copy_range(src: Path, start: int, end: int, dest: Path) -> None:
    """Copy bytes [start, end) of ``src`` to ``dest`` (through a temp name, fsynced)."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    with open(src, "rb") as f, open(tmp, "wb") as out:
        f.seek(start)
        left = end - start
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            out.write(chunk)
            left -= len(chunk)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, dest)


def _batch_errors(code: str, message: str) -> str:
    return json.dumps({"object": "list", "data": [{"code": code, "message": message, "param": None, "line": None}]})
