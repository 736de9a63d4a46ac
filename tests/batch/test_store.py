"""The SQLite job store: pragmas on every connection, duplicates, exactly-once commits, results in input order."""

from __future__ import annotations

import json

import pytest

from falconlm.batch.jsonl import InvalidLine, ValidLine
from falconlm.batch.records import Result
from falconlm.batch.store import Store, connect


def _valid(n: int, custom_id: str) -> ValidLine:
    return ValidLine(n, custom_id, "/v1/completions", '{"prompt":"x"}')


def test_every_connection_is_wal_with_synchronous_full(tmp_path):
    store = Store(tmp_path)
    for conn in (store._conn, connect(store.db_path)):
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    store.close()


def test_duplicates_become_errors_and_commits_are_exactly_once(tmp_path):
    store = Store(tmp_path)
    job = store.create_job("batch_" + "0" * 24, "cli", "/in.jsonl")
    lines = [_valid(1, "a"), _valid(2, "b"), InvalidLine(3, None, "invalid_json", "line 3 bad"), _valid(4, "a")]
    assert store.add_lines(job.id, lines, offset=100, line_no=4) == 1
    job = store.get_job(job.id)
    assert (job.total, job.failed, job.pending, job.ingest_offset, job.ingest_line) == (4, 2, 2, 100, 4)
    assert [r.custom_id for r in store.pending(job.id, 0, 10)] == ["a", "b"]

    results = [Result("b", "done", '{"custom_id":"b"}', 3, 4), Result("a", "done", '{"custom_id":"a"}', 3, 4)]
    assert store.commit_results(job.id, results) == 2
    assert store.commit_results(job.id, results) == 0  # a replay changes nothing
    job = store.get_job(job.id)
    assert (job.completed, job.failed, job.pending, job.completion_tokens) == (2, 2, 0, 8)
    assert [json.loads(x)["custom_id"] for x in store.iter_output(job.id)] == ["a", "b"]  # input order
    errors = [json.loads(x) for x in store.iter_errors(job.id)]
    assert [e["error"]["code"] for e in errors] == ["invalid_json", "duplicate_custom_id"]
    assert "already used on line 1" in errors[1]["error"]["message"]
    store.close()


def test_cancelled_jobs_report_pending_requests_as_errors(tmp_path):
    store = Store(tmp_path)
    job = store.create_job("batch_" + "1" * 24, "api", "file-x")
    store.add_lines(job.id, [_valid(1, "a"), _valid(2, "b")], offset=10, line_no=2)
    store.commit_results(job.id, [Result("a", "failed", '{"custom_id":"a","error":{}}')])
    assert store.request_cancel(job.id).status == "cancelling"
    errors = [json.loads(x) for x in store.iter_errors(job.id, cancelled=True)]
    assert [e["custom_id"] for e in errors] == ["a", "b"] and errors[1]["error"]["code"] == "batch_cancelled"
    assert store.set_status(job.id, "cancelled").cancelled_at is not None
    assert store.request_cancel(job.id).status == "cancelled"  # a final job stays as it is
    store.close()


def test_ingest_stopped_midway_resumes_from_the_committed_offset(tmp_path, monkeypatch):
    from falconlm.batch import ingest as ingesting

    source = tmp_path / "in.jsonl"
    request = {"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}
    lines = [json.dumps({"custom_id": f"r{i}", **request}) for i in range(25)]
    lines += ["{bad", lines[0]]  # a bad line and a duplicate of r0
    source.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(ingesting, "INGEST_CHUNK", 4)
    store = Store(tmp_path / "state")
    job = store.create_job("batch_" + "2" * 24, "cli", str(source))
    assert ingesting.ingest(store, job, source, should_stop=lambda: True) is False  # stops after one chunk
    job = store.get_job(job.id)
    assert (job.total, job.ingest_line) == (4, 4) and 0 < job.ingest_offset < source.stat().st_size
    assert ingesting.ingest(store, job, source) is True
    job = store.get_job(job.id)
    assert (job.total, job.failed, job.ingest_offset) == (27, 2, source.stat().st_size)
    assert [r.custom_id for r in store.pending(job.id, 0, 100)] == [f"r{i}" for i in range(25)]
    store.close()


def test_a_line_the_database_cannot_store_becomes_error_line(tmp_path):
    store = Store(tmp_path)
    job = store.create_job("batch_" + "2" * 24, "cli", "/in.jsonl")
    lines = [_valid(1, "a"), ValidLine(2, "b", "/v1/completions", '{"prompt":"\ud800"}'), _valid(3, "c")]
    store.add_lines(job.id, lines, offset=30, line_no=3)
    job = store.get_job(job.id)
    assert (job.total, job.failed, job.pending, job.ingest_line) == (3, 1, 2, 3)
    assert [r.custom_id for r in store.pending(job.id, 0, 10)] == ["a", "c"]
    (error,) = [json.loads(x) for x in store.iter_errors(job.id)]
    assert error["custom_id"] == "b" and error["error"]["code"] == "invalid_line"
    assert error["error"]["message"].startswith("line 2: cannot be stored")
    store.close()


def test_on_commit_runs_inside_the_result_transaction(tmp_path):
    calls: list[tuple[int, int]] = []
    store = Store(tmp_path / "state", on_commit=lambda results, marked: calls.append((results, marked)))
    job = store.create_job("batch_" + "3" * 24, "cli", "in.jsonl")
    lines = [ValidLine(i + 1, f"r{i}", "/v1/completions", "{}") for i in range(3)]
    store.add_lines(job.id, lines, 10, 3)
    done = [Result("r0", "done", "{}"), Result("r1", "done", "{}")]
    assert store.commit_results(job.id, done) == 2
    assert store.commit_results(job.id, [Result("r0", "done", "{}")]) == 0  # a replay marks nothing
    assert calls == [(2, 2), (1, 0)]

    def fail(results: int, marked: int) -> None:
        raise KeyboardInterrupt  # the process dies inside the transaction: nothing of it is kept

    failing = Store(tmp_path / "state", on_commit=fail)
    with pytest.raises(KeyboardInterrupt):
        failing.commit_results(job.id, [Result("r2", "failed", "{}")])
    assert [row.custom_id for row in store.pending(job.id, 0, 10)] == ["r2"]
