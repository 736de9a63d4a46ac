"""Atomic file writes: write a temp file beside the target, fsync it, rename it over the target, fsync the folder.

A crash leaves either the old file or the new one, never a part; the temp name is ``.NAME.tmp`` (one writer at
a time: the state directory is locked), and a crash's leftover is removed by the next start.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def temp_path(path: Path) -> Path:
    """The temp file that writing ``path`` goes through."""
    return path.with_name(f".{path.name}.tmp")


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "w") -> Iterator[IO]:
    """A file opened (``mode`` "w" for text, "wb" for bytes) that replaces ``path`` when the block ends without
    an error; on an error ``path`` is untouched and the temp file removed."""
    tmp = temp_path(path)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: some filesystems refuse)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
