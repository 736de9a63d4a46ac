"""OpenAI Batch JSONL: read input lines one at a time and validate each, shape output and error lines.

A bad line never stops the job, whatever its bytes: :func:`parse_line` never raises. A line that cannot be
decoded, parsed (nested too deep included), encoded as UTF-8 (a lone surrogate such as ``"\\ud800"``) or
validated becomes an :class:`InvalidLine` that the store keeps and the error file reports, with the line's
custom_id when one can be recovered and always with its line number.

Bodies are validated with the server's pydantic request models (``falconlm.serving.protocol``), so batch and
online requests accept the same fields; unknown fields are refused here (the server ignores them).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from pydantic import BaseModel, ValidationError

from ..serving.embedding_protocol import EmbeddingRequest
from ..serving.errors import describe_validation_errors
from ..serving.protocol import ChatCompletionRequest, CompletionRequest

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
ENDPOINTS: dict[str, type[BaseModel]] = {
    COMPLETIONS: CompletionRequest,
    CHAT_COMPLETIONS: ChatCompletionRequest,
    EMBEDDINGS: EmbeddingRequest,
}

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
    """Validate one input line; None for a blank line (not a request). ``endpoint`` pins the url.

    Never raises: whatever goes wrong with a line makes it an InvalidLine, so one line cannot stop a job.
    """
    try:
        return _parse_line(line_no, raw, endpoint)
    except Exception as exc:  # a line must never stop the job; the checks below cover the known cases
        custom_id = _recover_custom_id(raw)
        return InvalidLine(line_no, custom_id, "invalid_line", f"line {line_no}: cannot be read ({type(exc).__name__})")


def _parse_line(line_no: int, raw: bytes | None, endpoint: str | None) -> Line | None:
    if raw is None:
        return InvalidLine(line_no, None, "line_too_long", f"line {line_no}: over {MAX_LINE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _bad_json(line_no, raw, f"not UTF-8 ({exc.reason})")
    if line_no == 1:
        text = text.removeprefix("\ufeff")
    if not text.strip():
        return None
    try:
        item = json.loads(text)
    except RecursionError:
        return _bad_json(line_no, raw, "not valid JSON (nested too deeply)")
    except ValueError as exc:
        return _bad_json(line_no, raw, f"not valid JSON ({exc})")
    if not isinstance(item, dict):
        return InvalidLine(line_no, None, "invalid_json", f"line {line_no}: not a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return InvalidLine(line_no, None, "missing_custom_id", f"line {line_no}: no custom_id (a non-empty string)")
    if len(custom_id) > MAX_CUSTOM_ID_CHARS:
        return InvalidLine(line_no, None, "invalid_custom_id", f"line {line_no}: custom_id is over 512 characters")
    if not _is_unicode(custom_id):
        message = f"line {line_no}: custom_id holds a lone surrogate (not valid Unicode text)"
        return InvalidLine(line_no, custom_id, "invalid_custom_id", message)
    problem = _check_request(item, endpoint)
    if problem is not None:
        code, message = problem
        return InvalidLine(line_no, custom_id, code, f"line {line_no}: {message}")
    body = json.dumps(item["body"], ensure_ascii=False, separators=(",", ":"))
    if not _is_unicode(body):
        message = f"line {line_no}: body holds a lone surrogate such as '\\ud800' (not valid Unicode text)"
        return InvalidLine(line_no, custom_id, "invalid_body", message)
    return ValidLine(line_no, custom_id, item["url"], body)


def _bad_json(line_no: int, raw: bytes, reason: str) -> InvalidLine:
    return InvalidLine(line_no, _recover_custom_id(raw), "invalid_json", f"line {line_no}: {reason}")


def _is_unicode(text: str) -> bool:
    """False for a string that cannot be encoded as UTF-8 (a lone surrogate, from a JSON escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\]:,]')


def _recover_custom_id(raw: bytes | None) -> str | None:
    """The top-level ``custom_id`` string of a line that does not parse as a whole (too deep, ...), or None.

    Scans JSON tokens (strings and punctuation) and tracks the nesting depth, so a "custom_id" key nested
    inside the body, or inside a string, is never taken for the line's own.
    """
    if raw is None:
        return None
    try:
        depth, tokens = 0, _TOKEN.finditer(raw)
        for match in tokens:
            token = match.group()
            if token in (b"{", b"["):
                depth += 1
            elif token in (b"}", b"]"):
                depth -= 1
            elif depth == 1 and token == b'"custom_id"':
                colon, value = next(tokens, None), next(tokens, None)
                if colon is None or colon.group() != b":" or value is None or not value.group().startswith(b'"'):
                    return None
                between = raw[match.end() : colon.start()] + raw[colon.end() : value.start()]
                if between.strip():
                    return None  # the value is not a string (a number, an object, ...)
                custom_id = json.loads(value.group().decode("utf-8"))
                return custom_id if isinstance(custom_id, str) and 0 < len(custom_id) <= MAX_CUSTOM_ID_CHARS else None
    except Exception:  # best effort only: the line number still identifies the line
        return None
    return None


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


def parse_body(url: str, body: dict[str, Any]) -> CompletionRequest | ChatCompletionRequest | EmbeddingRequest:
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
    if not isinstance(request, EmbeddingRequest):
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
    """Compact JSON; a text holding a lone surrogate (from a bad input line) is escaped, so it is always UTF-8."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return text if _is_unicode(text) else json.dumps(obj, separators=(",", ":"))
