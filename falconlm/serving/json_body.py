"""JSON request bodies: checked JSON validated into a protocol model; any problem is a 400 APIError.

Before validation the parsed body must nest at most ``MAX_JSON_DEPTH`` levels and hold only text that is valid
Unicode (JSON allows a lone surrogate such as ``"\\ud800"``, which no tokenizer can encode).
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import bad_request, describe_validation_errors

ModelT = TypeVar("ModelT", bound=BaseModel)

MAX_JSON_DEPTH = 64


def check_json_value(data: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """400 for a value nested deeper than ``max_depth`` or holding a string that is not valid Unicode."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value)
        elif isinstance(value, dict | list):
            if depth > max_depth:
                raise bad_request(f"the request body nests deeper than {max_depth} levels")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_text(key)
                if isinstance(item, str | dict | list):
                    stack.append((item, depth + 1))


def _check_text(text: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        message = "the request body holds a lone surrogate (such as \\ud800), which is not valid text"
        raise bad_request(message) from None


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a checked JSON object; 400 for empty, malformed, too deep or non-object bodies."""
    if not raw.strip():
        raise bad_request("the request body is empty; send a JSON object")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise bad_request(f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}")
    check_json_value(data)
    return data


def validate(data: dict[str, Any], model: type[ModelT]) -> ModelT:
    """``data`` as ``model``; 400 naming the first bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param = describe_validation_errors(exc.errors())
        raise bad_request(message, param) from None
