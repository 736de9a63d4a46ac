"""Batch input lines: each bad line becomes an InvalidLine with a code and the line number, never an exception."""

from __future__ import annotations

import io
import json

import pytest

from falconlm.batch.jsonl import InvalidLine, ValidLine, error_line, output_line, parse_line, read_lines


def _line(**item) -> bytes:
    base = {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi", "max_tokens": 2}}
    base.update(item)
    return (json.dumps({k: v for k, v in base.items() if v is not ...}) + "\n").encode()


def test_valid_completion_and_chat_lines():
    line = parse_line(3, _line())
    assert isinstance(line, ValidLine) and line.line_no == 3 and line.custom_id == "a"
    assert json.loads(line.body) == {"prompt": "hi", "max_tokens": 2}
    chat = parse_line(1, _line(url="/v1/chat/completions", body={"messages": [{"role": "user", "content": "x"}]}))
    assert isinstance(chat, ValidLine) and chat.url == "/v1/chat/completions"


@pytest.mark.parametrize(
    ("raw", "code", "custom_id"),
    [
        (b"{not json\n", "invalid_json", None),
        (b"[1, 2]\n", "invalid_json", None),
        (b"\xff\xfe{}\n", "invalid_json", None),
        (_line(custom_id=...), "missing_custom_id", None),
        (_line(custom_id=""), "missing_custom_id", None),
        (_line(custom_id=7), "missing_custom_id", None),
        (_line(method="GET"), "invalid_method", "a"),
        (_line(url="/v1/moderations"), "invalid_url", "a"),
        (_line(body="hi"), "invalid_body", "a"),
        (_line(body={"prompt": "hi", "frobnicate": 1}), "unsupported_field", "a"),
        (_line(body={"prompt": "hi", "stream": True}), "unsupported_field", "a"),
        (_line(body={"prompt": "hi", "temperature": -1}), "invalid_body", "a"),
        (_line(body={"prompt": "hi", "max_tokens": "5"}), "invalid_body", "a"),
        (_line(body={"max_tokens": 5}), "invalid_body", "a"),
    ],
)
def test_invalid_lines_have_a_code_and_the_line_number(raw, code, custom_id):
    line = parse_line(9, raw)
    assert isinstance(line, InvalidLine)
    assert (line.code, line.custom_id, line.line_no) == (code, custom_id, 9)
    assert line.message.startswith("line 9: ")


def test_blank_lines_and_bom():
    assert parse_line(4, b"   \n") is None
    assert isinstance(parse_line(1, b"\xef\xbb\xbf" + _line()), ValidLine)


def test_endpoint_pins_the_url():
    line = parse_line(1, _line(), endpoint="/v1/chat/completions")
    assert isinstance(line, InvalidLine) and line.code == "invalid_url"


def test_read_lines_skips_an_over_long_line_without_reading_it_whole():
    data = b"short\n" + b"x" * 5000 + b"\nlast"
    got = list(read_lines(io.BytesIO(data), max_line_bytes=100))
    assert [line for _, line in got] == [b"short\n", None, b"last"]
    assert got[-1][0] == len(data)
    assert isinstance(parse_line(2, None), InvalidLine)


def test_output_and_error_line_shapes():
    out = json.loads(output_line("c", {"x": 1}))
    assert out["custom_id"] == "c" and out["error"] is None
    assert out["response"]["status_code"] == 200 and out["response"]["body"] == {"x": 1}
    assert out["id"].startswith("batch_req_") and out["response"]["request_id"]
    err = json.loads(error_line(None, "invalid_json", "bad"))
    assert err["response"] is None and err["error"] == {"code": "invalid_json", "message": "bad"}
