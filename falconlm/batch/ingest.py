"""Ingesting: validate a JSONL input file's lines and store them, resumably, after the job's committed offset."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .jsonl import parse_line, read_lines
from .records import Job
from .store import Store

INGEST_CHUNK = 512


def ingest(store: Store, job: Job, path: Path, should_stop: Callable[[], bool] = lambda: False) -> bool:
    """Validate and store the input lines after the job's committed offset; False when stopped early.

    Each chunk of lines is committed with the file offset after it, so a crash resumes at the last chunk."""
    with open(path, "rb") as f:
        f.seek(job.ingest_offset)
        line_no, offset, chunk, seen = job.ingest_line, job.ingest_offset, [], 0
        for offset, raw in read_lines(f):
            line_no += 1
            seen += 1
            parsed = parse_line(line_no, raw, job.endpoint)
            if parsed is not None:
                chunk.append(parsed)
            if len(chunk) >= INGEST_CHUNK or seen >= 4 * INGEST_CHUNK:
                store.add_lines(job.id, chunk, offset, line_no)
                chunk, seen = [], 0
                if should_stop():
                    return False
        store.add_lines(job.id, chunk, offset, line_no)
    return True
