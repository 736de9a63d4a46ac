"""OpenAI Batch JSONL: read input lines one at a time and validate each, shape output and error lines.

A bad line never stops the job: it becomes an :class:`InvalidLine` that the store keeps and the error file
reports. Bodies are validated with the server's pydantic request models (``falconlm.server.protocol``), so
batch and online requests accept the same fields; unknown fields are refused here (the server ignores them).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from pydantic import BaseModel, ValidationError

from ..server.errors import describe_validation_errors
from ..server.protocol import ChatCompletionRequest, CompletionRequest

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
ENDPOINTS: dict[str, type[BaseModel]] = {COMPLETIONS: CompletionRequest, CHAT_COMPLETIONS: ChatCompletionRequest}

MAX_LINE_BYTES = 8 * 1024 * 1024
MAX_CUSTOM_ID_CHARS = 512
# Parsed by the request models but meaningless in a batch.
UNSUPPORTED_IN_BATCH = {
    "stream": "stream is not supported in batch requests",
    "stream_options": "stream_options is not supported in batch requests",
}


@dataclass(frozen=True)
class ValidLine:
    """A request line that passed validation; ``body`` is its JSON text, re-parsed when it runs."""

    line_no: int
    custom_id: str
    url: str
    body: str


@dataclass(frozen=True)
class InvalidLine:
    """A line that cannot run; ``custom_id`` is None when the line did not give a usable one."""

    line_no: int
    custom_id: str | None
    code: str
    message: str


Line = ValidLine | InvalidLine


def read_lines(f: IO[bytes], max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | None]]:
    """Yield ``(offset after the line, line bytes)`` from a binary file; None for a line over the limit.

    Only one line is held at a time: an over-long line is skipped in chunks, never read whole.
    """
    while True:
        line = f.readline(max_line_bytes + 1)
        if not line:
            return
        if len(line) > max_line_bytes and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = f.readline(1 << 20)
            yield f.tell(), None
        else:
            yield f.tell(), line


def parse_line(line_no: int, raw: bytes | None, endpoint: str | None = None) -> Line | None:
    """Validate one input line; None for a blank line (not a request). ``endpoint`` pins the url."""
    if raw is None:
        return InvalidLine(line_no, None, "line_too_long", f"line {line_no}: over {MAX_LINE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return InvalidLine(line_no, None, "invalid_json", f"line {line_no}: not UTF-8 ({exc.reason})")
    if line_no == 1:
        text = text.removeprefix("\ufeff")
    if not text.strip():
        return None
    try:
        item = json.loads(text)
    except ValueError as exc:
        return InvalidLine(line_no, None, "invalid_json", f"line {line_no}: not valid JSON ({exc})")
    if not isinstance(item, dict):
        return InvalidLine(line_no, None, "invalid_json", f"line {line_no}: not a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return InvalidLine(line_no, None, "missing_custom_id", f"line {line_no}: no custom_id (a non-empty string)")
    if len(custom_id) > MAX_CUSTOM_ID_CHARS:
        return InvalidLine(line_no, None, "invalid_custom_id", f"line {line_no}: custom_id is over 512 characters")
    problem = _check_request(item, endpoint)
    if problem is not None:
        code, message = problem
        return InvalidLine(line_no, custom_id, code, f"line {line_no}: {message}")
    body = json.dumps(item["body"], ensure_ascii=False, separators=(",", ":"))
    return ValidLine(line_no, custom_id, item["url"], body)


def _check_request(item: dict[str, Any], endpoint: str | None) -> tuple[str, str] | None:
    """(error code, message) for the first problem of a request line, or None when it can run."""
    method = item.get("method")
    if method != "POST":
        return "invalid_method", f"method must be 'POST', got {method!r}"
    url = item.get("url")
    if url not in ENDPOINTS:
        return "invalid_url", f"url must be one of {', '.join(ENDPOINTS)}, got {url!r}"
    if endpoint is not None and url != endpoint:
        return "invalid_url", f"url {url!r} does not match the batch's endpoint {endpoint!r}"
    body = item.get("body")
    if not isinstance(body, dict):
        return "invalid_body", "body must be a JSON object"
    try:
        parse_body(url, body)
    except UnsupportedFieldError as exc:
        return "unsupported_field", str(exc)
    except ValueError as exc:
        return "invalid_body", str(exc)
    return None


class UnsupportedFieldError(ValueError):
    """The body has a field that batch jobs do not serve."""


def parse_body(url: str, body: dict[str, Any]) -> CompletionRequest | ChatCompletionRequest:
    """The request model for ``body``; ValueError (one line) for bad values, UnsupportedFieldError for fields."""
    model = ENDPOINTS[url]
    unknown = sorted(set(body) - set(model.model_fields))
    if unknown:
        raise UnsupportedFieldError(f"unsupported body field {unknown[0]!r} for {url}")
    for name, message in UNSUPPORTED_IN_BATCH.items():
        if body.get(name) is not None and body.get(name) is not False:
            raise UnsupportedFieldError(message)
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        raise ValueError(f"body.{describe_validation_errors(exc.errors())[0]}") from None
    request.to_sampling_params(None)  # value checks (ValueError naming the field)
    return request


# ---- output lines -------------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    """A random object id such as ``batch_req_<24 hex digits>``."""
    return f"{prefix}{secrets.token_hex(12)}"


def output_line(custom_id: str, body: dict[str, Any], status_code: int = 200) -> str:
    """One line of the output file (no newline)."""
    response = {"status_code": status_code, "request_id": new_id("req_"), "body": body}
    return _dumps({"id": new_id("batch_req_"), "custom_id": custom_id, "response": response, "error": None})


def error_line(custom_id: str | None, code: str, message: str) -> str:
    """One line of the error file (no newline)."""
    error = {"code": code, "message": message}
    return _dumps({"id": new_id("batch_req_"), "custom_id": custom_id, "response": None, "error": error})


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
