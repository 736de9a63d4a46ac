"""The batch job store: one SQLite database (WAL, ``synchronous=FULL``) under the state directory.

Tables: ``jobs`` (one row per batch), ``requests`` (one row per valid request, keyed by ``(job_id, custom_id)``,
status ``pending`` / ``done`` / ``failed``), ``line_errors`` (one row per invalid input line) and ``files``
(uploaded and produced files; their bytes live in ``files/<id>``). A result exists only once the transaction
that marks its request done has committed, so a crash loses at most uncommitted work and never duplicates it.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

from .jsonl import InvalidLine, Line, error_line
from .records import ACTIVE, FileRecord, Job, PendingRequest, Result

DB_NAME = "batch.db"
FINAL = ("completed", "failed", "cancelled", "expired")
FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
BATCH_ID = re.compile(r"^batch_[0-9a-f]{24}$")

CommitHook = Callable[[int, int], None]  # (results given, rows marked), called inside the result transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    status TEXT NOT NULL,
    endpoint TEXT,
    input_path TEXT NOT NULL,
    input_file_id TEXT,
    fingerprint TEXT,
    options TEXT NOT NULL DEFAULT '{}',
    ingest_offset INTEGER NOT NULL DEFAULT 0,
    ingest_line INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    metadata TEXT,
    completion_window TEXT,
    output_file_id TEXT,
    error_file_id TEXT,
    errors TEXT,
    created_at INTEGER NOT NULL,
    in_progress_at INTEGER,
    finalizing_at INTEGER,
    completed_at INTEGER,
    failed_at INTEGER,
    cancelling_at INTEGER,
    cancelled_at INTEGER
);
CREATE TABLE IF NOT EXISTS requests (
    job_id TEXT NOT NULL,
    custom_id TEXT NOT NULL,
    line_no INTEGER NOT NULL,
    url TEXT NOT NULL,
    body TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    result TEXT,
    PRIMARY KEY (job_id, custom_id)
);
CREATE INDEX IF NOT EXISTS requests_by_line ON requests (job_id, status, line_no);
CREATE TABLE IF NOT EXISTS line_errors (
    job_id TEXT NOT NULL,
    line_no INTEGER NOT NULL,
    result TEXT NOT NULL,
    PRIMARY KEY (job_id, line_no)
);
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
"""


_JOB_COLUMNS = [f.name for f in fields(Job) if f.name != "seq"]
_ACTIVE_MARKS = ", ".join("?" for _ in ACTIVE)
_TIMESTAMPED = {"in_progress", "finalizing", "completed", "failed", "cancelling", "cancelled"}


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit) with WAL and ``synchronous=FULL``."""
    conn = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout=60000")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


class Store:
    """Thread-safe access to one state directory's database and files."""

    def __init__(self, state_dir: str | os.PathLike[str], on_commit: CommitHook | None = None) -> None:
        """``on_commit`` is called inside each result transaction, before COMMIT (tests kill the process there)."""
        self.root = Path(state_dir)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.files_dir = self.root / "files"
        self.files_dir.mkdir(mode=0o700, exist_ok=True)
        self.db_path = self.root / DB_NAME
        self._lock = threading.RLock()
        self._conn = connect(self.db_path)
        with self._lock:
            self._conn.executescript(SCHEMA)
        self._on_commit = on_commit

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, tuple(args)).fetchall()

    # ---- jobs -----------------------------------------------------------------------------------------------------
    def create_job(self, job_id: str, source: str, input_path: str, **values: Any) -> Job:
        """Insert a job in status ``validating``."""
        row = {"id": job_id, "source": source, "status": "validating", "input_path": input_path}
        row.update(values)
        row.setdefault("created_at", int(time.time()))
        unknown = set(row) - set(_JOB_COLUMNS)
        if unknown:
            raise ValueError(f"unknown job fields {sorted(unknown)}")
        names = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._tx() as conn:
            conn.execute(f"INSERT INTO jobs ({names}) VALUES ({marks})", tuple(row.values()))
        job = self.get_job(job_id)
        assert job is not None
        return job

    def get_job(self, job_id: str) -> Job | None:
        rows = self._query("SELECT rowid AS seq, * FROM jobs WHERE id = ?", (job_id,))
        return Job(**dict(rows[0])) if rows else None

    def list_jobs(self, source: str | None = None, before_seq: int | None = None, limit: int = -1) -> list[Job]:
        """Jobs newest first, optionally only one source's and only those created before ``before_seq``."""
        rows = self._query(
            "SELECT rowid AS seq, * FROM jobs WHERE (?1 IS NULL OR source = ?1) AND (?2 IS NULL OR rowid < ?2) "
            "ORDER BY rowid DESC LIMIT ?3",
            (source, before_seq, limit),
        )
        return [Job(**dict(r)) for r in rows]

    def latest_job(self, source: str, input_path: str) -> Job | None:
        rows = self._query(
            "SELECT rowid AS seq, * FROM jobs WHERE source = ? AND input_path = ? ORDER BY rowid DESC LIMIT 1",
            (source, input_path),
        )
        return Job(**dict(rows[0])) if rows else None

    def set_status(self, job_id: str, status: str, **values: Any) -> Job:
        """Move a job to ``status`` (stamping ``<status>_at`` the first time) and set other columns."""
        values = dict(values)
        if status in _TIMESTAMPED:
            values.setdefault(f"{status}_at", int(time.time()))
        assigns = ["status = ?"]
        args: list[Any] = [status]
        for name, value in values.items():
            if name not in _JOB_COLUMNS:
                raise ValueError(f"unknown job field {name!r}")
            keep_first = name.endswith("_at")
            assigns.append(f"{name} = COALESCE({name}, ?)" if keep_first else f"{name} = ?")
            args.append(value)
        with self._tx() as conn:
            conn.execute(f"UPDATE jobs SET {', '.join(assigns)} WHERE id = ?", (*args, job_id))
        job = self.get_job(job_id)
        if job is None:
            raise KeyError(job_id)
        return job

    def request_cancel(self, job_id: str) -> Job | None:
        """Flag an active job for cancelling (status ``cancelling``); a finished job is left as it is."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE jobs SET cancel_requested = 1, status = 'cancelling', "
                f"cancelling_at = COALESCE(cancelling_at, ?) WHERE id = ? AND status IN ({_ACTIVE_MARKS})",
                (int(time.time()), job_id, *ACTIVE),
            )
        return self.get_job(job_id)

    def reopen(self, job_id: str) -> Job:
        """Take a cancelled job up again where it stopped: finished requests stay finished, the rest run.

        It goes back to ``validating`` when the cancel came before its input was all read, else ``in_progress``.
        """
        with self._tx() as conn:
            conn.execute(
                "UPDATE jobs SET status = CASE WHEN in_progress_at IS NULL THEN 'validating' ELSE 'in_progress' END, "
                "cancel_requested = 0, cancelling_at = NULL, cancelled_at = NULL, finalizing_at = NULL "
                "WHERE id = ? AND status = 'cancelled'",
                (job_id,),
            )
        job = self.get_job(job_id)
        if job is None:
            raise KeyError(job_id)
        return job

    def cancel_requested(self, job_id: str) -> bool:
        rows = self._query("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,))
        return bool(rows and rows[0][0])

    # ---- ingesting input lines ------------------------------------------------------------------------------------
    def add_lines(self, job_id: str, lines: list[Line], offset: int, line_no: int) -> int:
        """Store a chunk of parsed lines and the input position after them, in one transaction.

        A second request with a custom_id already stored, or a line the database cannot store, becomes an error
        row. Returns the number of duplicates.
        """
        duplicates = invalid = 0
        with self._tx() as conn:
            for line in lines:
                if isinstance(line, InvalidLine):
                    invalid += 1
                    text = error_line(line.custom_id, line.code, line.message)
                    conn.execute("INSERT INTO line_errors VALUES (?, ?, ?)", (job_id, line.line_no, text))
                    continue
                try:
                    cur = conn.execute(
                        "INSERT OR IGNORE INTO requests (job_id, custom_id, line_no, url, body) VALUES (?, ?, ?, ?, ?)",
                        (job_id, line.custom_id, line.line_no, line.url, line.body),
                    )
                except (UnicodeEncodeError, sqlite3.InterfaceError, sqlite3.DataError, OverflowError) as exc:
                    invalid += 1  # the statement failed alone; the chunk's transaction goes on
                    message = f"line {line.line_no}: cannot be stored ({type(exc).__name__})"
                    text = error_line(line.custom_id, "invalid_line", message)
                    conn.execute("INSERT INTO line_errors VALUES (?, ?, ?)", (job_id, line.line_no, text))
                    continue
                if cur.rowcount == 0:
                    duplicates += 1
                    first = conn.execute(
                        "SELECT line_no FROM requests WHERE job_id = ? AND custom_id = ?", (job_id, line.custom_id)
                    ).fetchone()[0]
                    message = f"line {line.line_no}: custom_id {line.custom_id!r} is already used on line {first}"
                    text = error_line(line.custom_id, "duplicate_custom_id", message)
                    conn.execute("INSERT INTO line_errors VALUES (?, ?, ?)", (job_id, line.line_no, text))
            conn.execute(
                "UPDATE jobs SET ingest_offset = ?, ingest_line = ?, total = total + ?, failed = failed + ? "
                "WHERE id = ?",
                (offset, line_no, len(lines), invalid + duplicates, job_id),
            )
        return duplicates

    # ---- running --------------------------------------------------------------------------------------------------
    def pending(self, job_id: str, after_line: int, limit: int) -> list[PendingRequest]:
        """Up to ``limit`` pending requests after input line ``after_line``, in input order."""
        rows = self._query(
            "SELECT custom_id, line_no, url, body FROM requests WHERE job_id = ? AND status = 'pending' "
            "AND line_no > ? ORDER BY line_no LIMIT ?",
            (job_id, after_line, limit),
        )
        return [PendingRequest(*r) for r in rows]

    def commit_results(self, job_id: str, results: list[Result]) -> int:
        """Mark requests done or failed with their result lines, all in one transaction; returns how many were
        still pending (a result for a request already finished is dropped, so replays never duplicate)."""
        committed = done = failed = prompt = completion = 0
        with self._tx() as conn:
            for r in results:
                cur = conn.execute(
                    "UPDATE requests SET status = ?, result = ? WHERE job_id = ? AND custom_id = ? "
                    "AND status = 'pending'",
                    (r.status, r.line, job_id, r.custom_id),
                )
                if cur.rowcount:
                    committed += 1
                    done += r.status == "done"
                    failed += r.status == "failed"
                    prompt += r.prompt_tokens
                    completion += r.completion_tokens
            conn.execute(
                "UPDATE jobs SET completed = completed + ?, failed = failed + ?, prompt_tokens = prompt_tokens + ?, "
                "completion_tokens = completion_tokens + ? WHERE id = ?",
                (done, failed, prompt, completion, job_id),
            )
            if self._on_commit is not None:
                self._on_commit(len(results), committed)
        return committed

    # ---- reading results back (own connection: long reads never hold the lock) -----------------------------------
    def iter_output(self, job_id: str) -> Iterator[str]:
        """Output lines of done requests, in input order."""
        sql = "SELECT result FROM requests WHERE job_id = ? AND status = 'done' ORDER BY line_no"
        for row in self._stream(sql, (job_id,)):
            yield row[0]

    def iter_errors(self, job_id: str, cancelled: bool = False) -> Iterator[str]:
        """Error lines (invalid lines and failed requests, plus pending ones when ``cancelled``), in input order."""
        sql = (
            "SELECT line_no, result, custom_id, status FROM requests WHERE job_id = ?1 AND status IN ('failed', ?2) "
            "UNION ALL SELECT line_no, result, NULL, 'failed' FROM line_errors WHERE job_id = ?1 ORDER BY line_no"
        )
        for _, result, custom_id, status in self._stream(sql, (job_id, "pending" if cancelled else "failed")):
            if status == "pending":
                yield error_line(custom_id, "batch_cancelled", "the batch was cancelled before this request ran")
            else:
                yield result

    def _stream(self, sql: str, args: tuple[Any, ...]) -> Iterator[sqlite3.Row]:
        conn = connect(self.db_path)
        try:
            yield from conn.execute(sql, args)
        finally:
            conn.close()

    # ---- files ----------------------------------------------------------------------------------------------------
    def file_path(self, file_id: str) -> Path:
        """Where a file's bytes live; ValueError for anything that is not a well-formed file id."""
        if not FILE_ID.match(file_id):
            raise ValueError(f"{file_id!r} is not a file id")
        return self.files_dir / file_id

    def add_file(self, record: FileRecord) -> None:
        """Register (or re-register, when finalizing runs again) a file whose bytes are in place."""
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", _record_values(record))

    def get_file(self, file_id: str) -> FileRecord | None:
        rows = self._query("SELECT * FROM files WHERE id = ?", (file_id,))
        return FileRecord(**dict(rows[0])) if rows else None

    def list_files(self, purpose: str | None = None, limit: int = 10000) -> list[FileRecord]:
        rows = self._query(
            "SELECT * FROM files WHERE (?1 IS NULL OR purpose = ?1) ORDER BY created_at DESC, rowid DESC LIMIT ?2",
            (purpose, limit),
        )
        return [FileRecord(**dict(r)) for r in rows]

    def used_bytes(self) -> int:
        """Bytes the state directory holds: every registered file plus the database (its WAL included)."""
        files = self._query("SELECT COALESCE(SUM(bytes), 0) FROM files")[0][0]
        database = sum(p.stat().st_size for p in self.root.glob(f"{DB_NAME}*") if p.is_file())
        return int(files) + database

    def delete_file(self, file_id: str) -> bool:
        with self._tx() as conn:
            deleted = conn.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount
        self.file_path(file_id).unlink(missing_ok=True)
        return bool(deleted)


class StateLock:
    """An exclusive, non-blocking lock on a state directory: one process runs its jobs at a time.

    The kernel drops it when the process dies, ``kill -9`` included.
    """

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.path = Path(state_dir) / "runner.lock"
        self._fd: int | None = None

    def acquire(self) -> bool:
        """True when this process now holds the lock, False when another one does."""
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        """The pid written by the holder, for messages ('?' when unknown)."""
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _record_values(record: FileRecord) -> tuple[Any, ...]:
    return (record.id, record.purpose, record.filename, record.bytes, record.created_at)
