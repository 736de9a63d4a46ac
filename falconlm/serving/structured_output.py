"""Structured output at the API's edge: the request's constraint as one ``StructuredOutputParams``, checked (compiled)
before the request reaches the engine, so a bad one is a 400 naming its field.

A request sets at most one of (a second is a 400 naming it):

- ``response_format``: ``{"type": "json_object"}`` (any JSON object) or ``{"type": "json_schema", "json_schema":
  {"name": ..., "schema": {...}, "strict": true}}`` (JSON valid by the schema; without ``schema``, any JSON
  object). ``strict`` false is enforced all the same. ``{"type": "text"}`` sets nothing.
- vLLM's extra_body fields: ``guided_json`` (a schema, or its JSON text), ``guided_regex``, ``guided_grammar``
  (Lark as llguidance reads it, or llama.cpp's GBNF), ``guided_choice`` (a list of strings), or the newer
  ``structured_outputs`` with one of ``json``, ``regex``, ``grammar``, ``choice`` or ``json_object``.

A constraint the grammar engine cannot enforce (an unsupported schema keyword, a regex with look-around, a grammar
that does not parse) is refused with a message containing :data:`REFUSAL_PHRASE`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from itertools import combinations
from typing import TYPE_CHECKING, Any

from ..engine.sampling_params import SamplingParams, StructuredOutputParams
from .errors import bad_request

if TYPE_CHECKING:
    from ..engine.async_engine import AsyncEngine

REFUSAL_PHRASE = "cannot be enforced"  # in every refusal of a constraint the grammar engine cannot compile


class ConstraintError(ValueError):
    """A bad constraint; ``param`` is the request field it came from."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def _schema(param: str, value: Any) -> dict:
    """A JSON Schema given as an object or as its JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ConstraintError(param, f"is not valid JSON, so it {REFUSAL_PHRASE}: {exc}") from exc
    if not isinstance(value, dict):
        raise ConstraintError(param, f"must be a JSON Schema object; {type(value).__name__} {REFUSAL_PHRASE}")
    return value


def _response_format(request: Any) -> StructuredOutputParams | None:
    response_format = request.response_format
    kind = response_format.type
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputParams(json_object=True)
    if kind != "json_schema":
        raise ConstraintError("response_format", f"type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    if response_format.json_schema is None:
        raise ConstraintError("response_format", "type 'json_schema' needs a json_schema object holding the schema")
    schema = response_format.json_schema.schema_
    if schema is None:
        return StructuredOutputParams(json_object=True)
    return StructuredOutputParams(json_schema=_schema("response_format", schema))


def _candidates(request: Any) -> list[tuple[str, Callable[[], StructuredOutputParams | None]]]:
    """(field, build) for each constraint field the request set."""
    found: list[tuple[str, Callable[[], StructuredOutputParams | None]]] = []
    if request.response_format is not None and request.response_format.type != "text":
        found.append(("response_format", lambda: _response_format(request)))
    if request.guided_json is not None:
        found.append(
            ("guided_json", lambda: StructuredOutputParams(json_schema=_schema("guided_json", request.guided_json)))
        )
    if request.guided_regex is not None:
        found.append(("guided_regex", lambda: StructuredOutputParams(regex=request.guided_regex)))
    if request.guided_grammar is not None:
        found.append(("guided_grammar", lambda: StructuredOutputParams(grammar=request.guided_grammar)))
    if request.guided_choice is not None:
        found.append(("guided_choice", lambda: StructuredOutputParams(choice=request.guided_choice)))
    options = request.structured_outputs
    if options is not None:
        schema = options.json_
        if schema is not None:
            param = "structured_outputs.json"
            found.append((param, lambda: StructuredOutputParams(json_schema=_schema(param, schema))))
        for name in ("regex", "grammar", "choice"):
            value = getattr(options, name)
            if value is not None:
                found.append((f"structured_outputs.{name}", lambda n=name, v=value: StructuredOutputParams(**{n: v})))
        if options.json_object:
            found.append(("structured_outputs.json_object", lambda: StructuredOutputParams(json_object=True)))
    return found


def constraint_param(request: Any) -> str | None:
    """The field that carries the request's constraint, or None."""
    found = _candidates(request)
    return found[0][0] if found else None


def request_constraint(request: Any) -> StructuredOutputParams | None:
    """The request's constraint, or None; ConstraintError names the field of a bad or second one."""
    found = _candidates(request)
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(param for param, _ in found)
        raise ConstraintError(found[1][0], f"a request takes one structured-output constraint, got {names}")
    param, build = found[0]
    try:
        return build()
    except ConstraintError:
        raise
    except ValueError as exc:
        raise ConstraintError(param, str(exc)) from exc


async def check_constraint(
    engine: AsyncEngine, request: Any, params: Sequence[SamplingParams], param: str | None = None
) -> None:
    """Compile the params' constraint now (off the event loop; the engine keeps it cached for the request), so
    one the grammar engine cannot enforce is a 400 naming its field (``param``, else the request's constraint
    field) rather than a failed engine request."""
    constraint = params[0].structured_output if params else None
    if constraint is None:
        return
    param = param or constraint_param(request) or "response_format"
    try:
        await asyncio.to_thread(engine.engine.grammars.compile, constraint)
    except ValueError as exc:
        raise bad_request(f"{param}: {exc}", param) from exc


# ---- the rules the OpenAPI document states (request_types.completion_rules / chat_rules) ----------------------------


def _is_set(name: str, value_schema: dict | None = None) -> dict[str, Any]:
    return {"required": [name], "properties": {name: value_schema or {"not": {"type": "null"}}}}


def one_constraint_rules() -> list[dict[str, Any]]:
    """JSON Schema rules: at most one constraint field is set (non-null; ``response_format`` other than text), and
    ``structured_outputs`` sets at most one of its own."""
    inner = [_is_set(name) for name in ("json", "regex", "grammar", "choice")]
    inner.append(_is_set("json_object", {"const": True}))
    constrained_format = {"type": "object", "required": ["type"], "properties": {"type": {"not": {"const": "text"}}}}
    top = [
        _is_set("response_format", constrained_format),
        *(_is_set(name) for name in ("guided_json", "guided_regex", "guided_grammar", "guided_choice")),
        _is_set("structured_outputs", {"type": "object", "anyOf": inner}),
    ]
    rules: list[dict[str, Any]] = [{"not": {"allOf": [a, b]}} for a, b in combinations(top, 2)]
    two_inner = {"anyOf": [{"allOf": [a, b]} for a, b in combinations(inner, 2)]}
    rules.append({"properties": {"structured_outputs": {"anyOf": [{"type": "null"}, {"not": two_inner}]}}})
    return rules


def response_format_rules(schema: dict[str, Any]) -> None:
    """``json_schema`` is required (an object) with type ``json_schema``."""
    schema["anyOf"] = [
        {"properties": {"type": {"enum": ["text", "json_object"]}}},
        {
            "required": ["json_schema"],
            "properties": {"type": {"const": "json_schema"}, "json_schema": {"type": "object"}},
        },
    ]
