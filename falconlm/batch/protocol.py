"""The OpenAPI contract of ``/v1/files`` and ``/v1/batches`` (served with ``--state-dir``): OpenAI's file and
batch objects as pydantic models, and each route's body, responses and errors.

The batch routes (``falconlm.batch.routes``) check their inputs by hand; the
models here state the same shapes and limits so the document matches what the routes send and accept.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MetadataValue = Annotated[str, Field(max_length=512)]


def _metadata_keys(schema: dict[str, Any]) -> None:
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "object":
            branch["propertyNames"] = {"maxLength": 64}
            branch["maxProperties"] = 16


Metadata = Annotated[dict[str, MetadataValue] | None, Field(json_schema_extra=_metadata_keys)]


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    status_details: str | None = None
    expires_at: int | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class BatchCreateRequest(BaseModel):
    """``POST /v1/batches``: a batch over an uploaded file (purpose "batch")."""

    model_config = ConfigDict(extra="ignore", strict=True)
    input_file_id: Annotated[str, Field(pattern=r"^file-[0-9a-f]{24}$")]
    endpoint: Literal["/v1/completions", "/v1/chat/completions", "/v1/embeddings"]
    completion_window: Literal["24h"]
    metadata: Metadata = None


class BatchRequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str
    errors: dict[str, Any] | None = None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None = None
    usage: dict[str, Any] | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["purpose", "file"],
                "properties": {
                    "purpose": {"type": "string", "enum": ["batch"]},
                    "file": {"type": "string", "format": "binary"},
                },
            }
        }
    },
}

# (method, path) -> (request body model or raw body, 200 model or media type, error statuses)
BATCH_ROUTES: dict[tuple[str, str], tuple[Any, Any, tuple[int, ...]]] = {
    ("post", "/v1/files"): (UPLOAD_BODY, FileObject, (400, 413, 503)),
    ("get", "/v1/files"): (None, FileList, (400,)),
    ("get", "/v1/files/{file_id}"): (None, FileObject, (404,)),
    ("delete", "/v1/files/{file_id}"): (None, FileDeleted, (400, 404)),
    ("get", "/v1/files/{file_id}/content"): (None, "application/octet-stream", (404,)),
    ("post", "/v1/batches"): (BatchCreateRequest, BatchObject, (400, 413, 503)),
    ("get", "/v1/batches"): (None, BatchList, (400, 404)),
    ("get", "/v1/batches/{batch_id}"): (None, BatchObject, (404,)),
    ("post", "/v1/batches/{batch_id}/cancel"): (None, BatchObject, (400, 404)),
}
