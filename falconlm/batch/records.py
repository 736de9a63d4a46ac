"""The store's records: a job, a request waiting to run, a finished request's result, a stored file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")


@dataclass
class Job:
    """A row of ``jobs`` (plus its rowid as ``seq``, the creation order)."""

    seq: int
    id: str
    source: str
    status: str
    endpoint: str | None
    input_path: str
    input_file_id: str | None
    fingerprint: str | None
    options: str
    ingest_offset: int
    ingest_line: int
    total: int
    completed: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    cancel_requested: int
    metadata: str | None
    completion_window: str | None
    output_file_id: str | None
    error_file_id: str | None
    errors: str | None
    created_at: int
    in_progress_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None

    @property
    def pending(self) -> int:
        return self.total - self.completed - self.failed

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE

    @property
    def option(self) -> dict[str, Any]:
        return json.loads(self.options or "{}")


@dataclass(frozen=True)
class PendingRequest:
    custom_id: str
    line_no: int
    url: str
    body: str


@dataclass(frozen=True)
class Result:
    """A finished request: ``status`` "done" (an output line) or "failed" (an error line)."""

    custom_id: str
    status: str
    line: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class FileRecord:
    id: str
    purpose: str
    filename: str
    bytes: int
    created_at: int
