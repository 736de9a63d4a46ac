"""Poison input lines: whatever a line's bytes, it becomes an error line and never stops the job.

Property tests (hypothesis) drive the JSONL reader with arbitrary bytes, unicode and nesting; the regression
tests replay the lines that used to stop a job for good (a lone surrogate, a line nested 5,000 levels deep).
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from falconlm.batch.ingest import ingest
from falconlm.batch.jsonl import InvalidLine, ValidLine, error_line, parse_line, read_lines
from falconlm.batch.store import Store
from falconlm.cli import main

DEEP = 5000


def request(custom_id: str, prompt: object = "Once upon a time", **body: object) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": {"prompt": prompt, **body}}


def lone_surrogate_line(custom_id: str = "surrogate") -> bytes:
    return json.dumps(request(custom_id, "say \ud800 twice")).encode()  # ensure_ascii writes the \ud800 escape


def deep_line(custom_id: str = "deep") -> bytes:
    nested = "[" * DEEP + "]" * DEEP
    head = f'{{"custom_id": "{custom_id}", "method": "POST", "url": "/v1/completions", "body": {{"prompt": '
    return (head + nested + "}}").encode()


def assert_storable(line: InvalidLine | ValidLine | None) -> None:
    """What the store keeps must be UTF-8 text; an error line must be JSON that names the line."""
    if isinstance(line, ValidLine):
        line.custom_id.encode("utf-8")
        line.body.encode("utf-8")
        json.loads(line.body)
    elif isinstance(line, InvalidLine):
        text = error_line(line.custom_id, line.code, line.message)
        text.encode("utf-8")
        parsed = json.loads(text)
        assert parsed["custom_id"] == line.custom_id
        assert parsed["error"]["message"].startswith(f"line {line.line_no}: ")


# ---- property tests ---------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_give_an_error_line_never_an_exception(raw):
    line = parse_line(7, raw)
    assert line is None or isinstance(line, InvalidLine | ValidLine)
    assert_storable(line)


# Any code point, lone surrogates included (st.text leaves them out, so strings are joined from characters).
any_char = st.characters(exclude_categories=()) | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
any_text = st.lists(any_char, max_size=40).map("".join)


@settings(max_examples=300, deadline=None)
@given(any_text, any_text)
def test_arbitrary_unicode_including_lone_surrogates_never_raises(prompt, custom_id):
    # json.dumps escapes lone surrogates (\udXXX): legal JSON that is not encodable as UTF-8 once parsed.
    line = parse_line(3, json.dumps(request(custom_id, prompt, max_tokens=2)).encode())
    assert line is not None
    assert_storable(line)
    if isinstance(line, InvalidLine) and line.custom_id is not None:
        assert line.custom_id == json.loads(json.dumps(custom_id))  # JSON joins escaped surrogate pairs


@settings(max_examples=200, deadline=None)
@given(json_values, st.integers(min_value=0, max_value=3000))
def test_arbitrary_json_and_nesting_give_an_error_line_never_an_exception(value, depth):
    body = {"prompt": "[" * depth + json.dumps(value) + "]" * depth}
    raw = ('{"custom_id":"c","method":"POST","url":"/v1/completions","body":' + json.dumps(body) + "}").encode()
    nested_raw = b'{"custom_id":"c","method":"POST","url":"/v1/completions","body":{"prompt":'
    nested_raw += b"[" * depth + json.dumps(value).encode() + b"]" * depth + b"}}"
    for candidate in (raw, nested_raw, json.dumps(value).encode()):
        line = parse_line(1, candidate)
        assert_storable(line)


request_lines = st.builds(lambda cid, prompt: json.dumps(request(cid, prompt)).encode(), any_text, any_text)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=120).filter(lambda b: b"\n" not in b) | request_lines, max_size=8))
def test_ingesting_arbitrary_lines_stores_one_row_per_line(lines):
    data = b"".join(line + b"\n" for line in lines)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "in.jsonl"
        source.write_bytes(data)
        store = Store(Path(tmp) / "state")
        try:
            job = store.create_job("batch_" + "0" * 24, "cli", str(source))
            assert ingest(store, job, source)
            job = store.get_job(job.id)
            expected = sum(parse_line(i, raw) is not None for i, (_, raw) in enumerate(read_lines(io.BytesIO(data)), 1))
            assert job.total == expected == job.failed + job.pending
            assert all(json.loads(x)["error"]["message"].startswith("line ") for x in store.iter_errors(job.id))
        finally:
            store.close()


# ---- regression tests --------------------------------------------------------------------------------------------


def test_lone_surrogate_line_becomes_error_line():
    line = parse_line(2, lone_surrogate_line())
    assert isinstance(line, InvalidLine)
    assert (line.custom_id, line.code, line.line_no) == ("surrogate", "invalid_body", 2)
    assert_storable(line)


def test_lone_surrogate_custom_id_is_kept_escaped_in_its_error_line():
    line = parse_line(5, json.dumps(request("id-\udfff")).encode())
    assert isinstance(line, InvalidLine) and line.code == "invalid_custom_id"
    text = error_line(line.custom_id, line.code, line.message)
    assert "\\udfff" in text and json.loads(text)["custom_id"] == "id-\udfff"


def test_deeply_nested_line_becomes_error_line_with_its_custom_id():
    line = parse_line(4, deep_line())
    assert isinstance(line, InvalidLine)
    assert (line.custom_id, line.code) == ("deep", "invalid_json")
    assert "nested too deeply" in line.message


def test_custom_id_is_recovered_only_from_the_top_level_of_a_broken_line():
    nested_only = b'{"body": {"custom_id": "inner"}, "url": "/v1/completions", "oops'
    assert parse_line(1, nested_only).custom_id is None
    in_a_string = b'{"note": "\\"custom_id\\": \\"fake\\"", "oops'
    assert parse_line(1, in_a_string).custom_id is None
    truncated = b'{"custom_id": "kept", "method": "POST", "body": {"prompt": "x"'
    assert parse_line(1, truncated).custom_id == "kept"
    not_a_string = b'{"custom_id": 7, "oops'
    assert parse_line(1, not_a_string).custom_id is None


def _run(tmp_path: Path, checkpoint: Path, source: Path) -> int:
    out, err, state = tmp_path / "out.jsonl", tmp_path / "err.jsonl", tmp_path / "state"
    argv = ["batch", "run", str(source), "-o", str(out), "--errors", str(err), "--state", str(state)]
    return main([*argv, "--model", str(checkpoint), "--dtype", "float32"])


def test_poison_lines_do_not_stop_a_cli_job(tmp_path, tiny_checkpoint):
    good = [json.dumps(request(f"ok{i}", max_tokens=2, temperature=0)).encode() for i in range(2)]
    lines = [good[0], lone_surrogate_line(), deep_line(), b"\xff\xfe not utf-8", good[1]]
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    assert _run(tmp_path, tiny_checkpoint, source) == 0
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    err = [json.loads(x) for x in (tmp_path / "err.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [o["custom_id"] for o in out] == ["ok0", "ok1"]
    assert [(e["custom_id"], e["error"]["code"]) for e in err] == [
        ("surrogate", "invalid_body"),
        ("deep", "invalid_json"),
        (None, "invalid_json"),
    ]
    assert [e["error"]["message"].split(":")[0] for e in err] == ["line 2", "line 3", "line 4"]
