"""``/v1/files`` and ``/v1/batches`` on HTTP: a FastAPI router over a :class:`BatchService`.

Uploads are parsed by FastAPI (``UploadFile``, python-multipart); the app that includes the router caps their
size (``UPLOAD_BODY_LIMIT``) before they are parsed. Errors are raised as APIError, which the app sends as
OpenAI error objects.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel
from starlette.responses import Response

from ..serving.errors import bad_request
from ..serving.json_body import parse_json
from .protocol import FileDeleted
from .service import BatchService, file_object

MULTIPART_OVERHEAD_BYTES = 16 * 1024  # the form's boundaries, part headers and the purpose field


def upload_body_limit(max_upload_bytes: int) -> int:
    """The most bytes a ``POST /v1/files`` body may have for a file of ``max_upload_bytes``."""
    return max_upload_bytes + MULTIPART_OVERHEAD_BYTES


def _json(model: BaseModel) -> Response:
    return JSONResponse(model.model_dump())


def build_batch_router(service: BatchService) -> APIRouter:
    """The routes; ``service`` runs inside the lifespan of the app that includes the router (after its engine
    starts, stopping before it stops)."""

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    router = APIRouter(lifespan=lifespan)

    @router.post("/v1/files")
    async def upload_file(
        request: Request,
        purpose: Annotated[str | None, Form()] = None,
        file: Annotated[UploadFile | None, File()] = None,
    ) -> Response:
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            raise bad_request("upload the file as multipart/form-data with a 'purpose' and a 'file' part", "file")
        if file is None:
            return _json(await service.add_file(purpose, None, None, 0))
        size = file.size if file.size is not None else 0
        return _json(await service.add_file(purpose, file.filename, file.file, size))

    @router.get("/v1/files")
    async def list_files(purpose: str | None = None, limit: int = 10000) -> Response:
        return _json(service.list_files(purpose, limit))

    @router.get("/v1/files/{file_id}")
    async def get_file(file_id: str) -> Response:
        return _json(file_object(service.get_file(file_id)))

    @router.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str) -> Response:
        return FileResponse(service.file_content_path(file_id), media_type="application/octet-stream")

    @router.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str) -> Response:
        service.delete_file(file_id)
        return _json(FileDeleted(id=file_id, deleted=True))

    @router.post("/v1/batches")
    async def create_batch(request: Request) -> Response:
        body = parse_json(await request.body())  # 400 for bad JSON, deep nesting or lone surrogates
        return _json(service.batch_object(service.create_batch(body)))

    @router.get("/v1/batches")
    async def list_batches(after: str | None = None, limit: int = 20) -> Response:
        return _json(service.list_batches(after, limit))

    @router.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str) -> Response:
        return _json(service.batch_object(service.get_batch(batch_id)))

    @router.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str) -> Response:
        return _json(service.batch_object(await service.cancel_batch(batch_id)))

    return router
