"""The output and error files of a job, written from the store."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .atomic import atomic_write
from .records import Job
from .store import Store


def write_jsonl(path: Path, lines: Iterable[str]) -> int:
    """Write lines to ``path`` atomically; returns the line count."""
    count = 0
    with atomic_write(path) as f:
        for line in lines:
            f.write(line)
            f.write("\n")
            count += 1
    return count


def write_outputs(store: Store, job: Job, output: Path, errors: Path | None, cancelled: bool) -> tuple[int, int]:
    """Write the job's output (and error) file from the store; returns (output lines, error lines)."""
    done = write_jsonl(output, store.iter_output(job.id))
    failed = 0
    if errors is not None:
        failed = write_jsonl(errors, store.iter_errors(job.id, cancelled))
    return done, failed
