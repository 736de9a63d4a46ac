"""Typed errors of the serving layer: :class:`APIError` carries the HTTP status, OpenAI's error type and code,
and the message; ``to_dict()`` is the OpenAI error object (``{"error": {"message", "type", "param", "code"}}``).

The HTTP layer sends them as responses (``falconlm.server.errors``); the batch runner writes them as error lines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from ..engine.sampling_params import SamplingParams

# status -> (error type, default code), after OpenAI's names.
ERROR_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("not_found_error", None),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    421: ("invalid_request_error", "misdirected_request"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", "internal_error"),
    502: ("server_error", "bad_gateway"),  # a replica behind serve --ray-replicas failed mid-answer
    503: ("service_unavailable_error", "service_unavailable"),
}


class APIError(Exception):
    """An error the client should see: HTTP status plus an OpenAI error object."""

    def __init__(
        self,
        status_code: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    @property
    def error_type(self) -> str:
        """OpenAI's error type for the status (``invalid_request_error``, ``server_error``, ...)."""
        return ERROR_KINDS.get(self.status_code, ("invalid_request_error", None))[0]

    @property
    def error_code(self) -> str | None:
        """The code the error object states: the given one, else the status's default."""
        return self.code or ERROR_KINDS.get(self.status_code, ("", None))[1]

    def to_dict(self) -> dict:
        return error_body(self.status_code, self.message, self.param, self.code)


class QueueFull(APIError):
    """429: the engine's waiting queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(429, message, headers={"Retry-After": str(retry_after)})


class EngineUnavailable(APIError):
    """503: the model is loading, failed to load, or the server is shutting down; retry after ``retry_after``."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(503, message, headers={"Retry-After": str(retry_after)})


def error_body(status_code: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind, default_code = ERROR_KINDS.get(status_code, ("invalid_request_error", None))
    return {"error": {"message": message, "type": kind, "param": param, "code": code or default_code}}


# The one 400 that a request valid by the OpenAPI schema can still get, as no schema can state it: a prompt plus
# max_tokens over the context (its message says "maximum context length"). The schema test allows only this.
CONTEXT_LENGTH_PHRASE = "maximum context length"
CONFLICTING_PARAMETERS = "conflicting_parameters"  # fields that only make sense together (the schema says so too)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_value_error(exc: ValueError) -> APIError:
    """A 400 for a ValueError; SamplingParams messages start with the field name, which becomes ``param``."""
    message = str(exc) or "invalid request"
    first = message.split(" ", 1)[0].rstrip(":")
    param = getattr(exc, "param", None)  # an error that knows its field (structured_output.ConstraintError)
    return APIError(400, message, param=param or (first if first in _SAMPLING_FIELDS else None))


_SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)} | {
    "top_logprobs",
    "response_format",
    "max_completion_tokens",
    "stream_options",
    "suffix",
    "best_of",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
}


def describe_validation_errors(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """One readable line, and the offending field, from pydantic's error list."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if not loc and first.get("type") == "missing":
        return "the request body is missing (expected a JSON object)", None
    # A union puts its branch names (e.g. 'str', 'list[int]') in the location: stop the field path there.
    branch = next((i for i, part in enumerate(loc) if "[" in part or part in _TYPE_NAMES), None)
    param = ".".join(loc[:branch] if branch is not None else loc) or None
    msg = str(first.get("msg")).removeprefix("Value error, ")
    message = f"{param}: {msg}" if param else msg
    if branch is not None:
        message = f"{param}: the value matches none of the accepted types ({msg}, ...)"
    elif len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return message, param


_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "function-after", "json-or-python"}
