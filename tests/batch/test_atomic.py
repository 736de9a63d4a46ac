"""The one atomic-write utility: a failed write leaves the old file whole and no temp file behind."""

from __future__ import annotations

import pytest

from falconlm.batch.atomic import atomic_write, temp_path
from falconlm.batch.outputs import write_jsonl


def test_atomic_write_replaces_the_file_only_on_success(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write("half of the new")
        raise RuntimeError("the writer failed midway")
    assert target.read_text() == "old\n"
    assert not temp_path(target).exists()
    with atomic_write(target, "wb") as f:
        f.write(b"new\n")
    assert target.read_bytes() == b"new\n" and not temp_path(target).exists()


def test_write_jsonl_counts_and_terminates_lines(tmp_path):
    target = tmp_path / "lines.jsonl"
    assert write_jsonl(target, (f'{{"n": {i}}}' for i in range(3))) == 3
    assert target.read_text() == '{"n": 0}\n{"n": 1}\n{"n": 2}\n'
    assert write_jsonl(target, []) == 0 and target.read_text() == ""
