"""The OpenAPI contract: each route's request body, responses and error objects, from the pydantic models the
server validates with.

The routes read their bodies themselves (``body.py``: Content-Type, nesting and text checks before pydantic), so
FastAPI cannot see the request models: :func:`documented` declares them per route, and :func:`install_openapi`
adds their schemas to the document. Bounds that only the running server knows (the model's name, context and
vocabulary, ``--max-choices``, ``--max-logprobs``) are marked ``x-limit`` in the models and filled in here, so a
request valid by the schema is one the server accepts, apart from the combinations no schema can state (a
prompt plus max_tokens over the context, and the others listed in ``errors.py`` beside CONTEXT_LENGTH_PHRASE).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from ..serving.protocol import ErrorResponse

REF = "#/components/schemas/{model}"
ERROR_TEXT = {
    400: "Invalid request: the error object names the field (`param`).",
    401: "Missing or wrong API key.",
    403: "The request came from a web page whose Origin is not allowed (--allowed-origins).",
    404: "No such model, file or batch.",
    409: "The object is not in a state that allows this.",
    413: "The request body is over the size limit.",
    415: "The body is not sent as application/json.",
    421: "The Host header does not name this server (--allowed-hosts).",
    429: "The waiting queue is full; retry after Retry-After seconds.",
    503: "The model is loading or the server is shutting down; retry after Retry-After seconds.",
}
COMMON_ERRORS = (400, 403, 421)  # a bad Content-Length or query, a foreign Origin, a foreign Host: any route
JSON_BODY_ERRORS = (400, 413, 415)
GENERATION_ERRORS = (*JSON_BODY_ERRORS, 404, 429, 503)


def documented(
    request: type[BaseModel] | None = None,
    response: type[BaseModel] | None = None,
    stream: type[BaseModel] | None = None,
    errors: Iterable[int] = (),
    media_type: str | None = None,
) -> dict[str, Any]:
    """Keyword arguments for a route decorator: its JSON request body, its 200 (JSON ``response``, and
    ``text/event-stream`` of ``stream`` chunks when it streams, or ``media_type`` text) and its error objects."""
    responses: dict[int | str, dict[str, Any]] = {}
    ok: dict[str, Any] = {"description": "Success."}
    if response is not None:
        ok["model"] = response
    if stream is not None:
        name = response.__name__ if response else "JSON"
        ok["description"] = (
            f"A {name} object, or with `stream: true` server-sent events: `data: <{stream.__name__} JSON>` "
            "events (an error object if the request fails midway), then `data: [DONE]`."
        )
        ok["content"] = {"text/event-stream": {"schema": sse_event_schema(stream)}}
        _EXTRA_MODELS[stream.__name__] = stream
    if media_type is not None:
        ok["content"] = {media_type: {"schema": {"type": "string"}}}
    responses[200] = ok
    for status in sorted({*COMMON_ERRORS, *errors}):
        responses[status] = {"model": ErrorResponse, "description": ERROR_TEXT.get(status, "Error.")}
    kwargs: dict[str, Any] = {"responses": responses}
    if request is not None:
        ref = {"$ref": REF.format(model=request.__name__)}
        body = {"required": True, "content": {"application/json": {"schema": ref}}}
        kwargs["openapi_extra"] = {"requestBody": body}
        _REQUEST_MODELS[request.__name__] = request
    return kwargs


def sse_event_schema(chunk: type[BaseModel]) -> dict[str, Any]:
    """One server-sent event (OpenAPI 3.1: the schema of a ``text/event-stream`` describes each event): its data
    is a ``chunk`` or an error object as JSON, or ``[DONE]``."""
    payload = {"anyOf": [{"$ref": REF.format(model=chunk.__name__)}, {"$ref": REF.format(model="ErrorResponse")}]}
    data = {
        "type": "string",
        "if": {"const": "[DONE]"},
        "else": {"contentMediaType": "application/json", "contentSchema": payload},
    }
    return {"type": "object", "required": ["data"], "properties": {"data": data, "event": {"type": "string"}}}


_REQUEST_MODELS: dict[str, type[BaseModel]] = {}
_EXTRA_MODELS: dict[str, type[BaseModel]] = {}  # stream chunks: referenced only from event schemas


# (method, path) -> (request body model or raw body, 200 model or media type, error statuses)
RouteDocs = Mapping[tuple[str, str], tuple[Any, Any, tuple[int, ...]]]


def install_openapi(
    app: FastAPI, limits: Callable[[], dict[str, Any] | None], bearer: bool, route_docs: RouteDocs | None = None
) -> None:
    """Make ``app.openapi()`` the full contract. ``limits()`` gives the runtime bounds (None while the model
    loads: the document is then built without them and not cached). ``bearer``: every route but /health needs
    an API key. ``route_docs`` documents routes mounted from elsewhere (the batch routes)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for models, mode in ((_REQUEST_MODELS, "validation"), (_EXTRA_MODELS, "serialization")):
            for model in models.values():
                _add_model(components, model, mode)
        _document_routes(schema, components, route_docs or {})
        bounds = limits()
        _fill_limits(components, bounds or {})
        if bearer:
            _require_bearer(schema)
        if bounds is not None:
            app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _error_responses(statuses: Iterable[int]) -> dict[str, Any]:
    ref = {"$ref": REF.format(model="ErrorResponse")}
    return {
        str(status): {"description": ERROR_TEXT.get(status, "Error."), "content": {"application/json": {"schema": ref}}}
        for status in sorted({*COMMON_ERRORS, *statuses})
    }


def _document_routes(schema: dict[str, Any], components: dict[str, Any], route_docs: RouteDocs) -> None:
    """Bodies and responses of the routes ``route_docs`` names (those served)."""
    paths = schema.get("paths", {})
    for (method, path), (body, ok, errors) in route_docs.items():
        operation = paths.get(path, {}).get(method)
        if operation is None:
            continue
        if isinstance(body, type):
            _add_model(components, body, "validation")
            ref = {"$ref": REF.format(model=body.__name__)}
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref}}}
        elif body is not None:
            operation["requestBody"] = body
        if isinstance(ok, type):
            _add_model(components, ok, "serialization")
            content = {"application/json": {"schema": {"$ref": REF.format(model=ok.__name__)}}}
        else:
            content = {ok: {"schema": {"type": "string", "format": "binary"}}}
        operation["responses"] = {"200": {"description": "Success.", "content": content}, **_error_responses(errors)}


def _add_model(components: dict[str, Any], model: type[BaseModel], mode: str) -> None:
    model_schema = model.model_json_schema(ref_template=REF, mode=mode)  # type: ignore[arg-type]
    for def_name, definition in model_schema.pop("$defs", {}).items():
        components.setdefault(def_name, definition)
    components[model.__name__] = model_schema


def _require_bearer(schema: dict[str, Any]) -> None:
    schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            operation["security"] = [] if path == "/health" else [{"bearer": []}]
            if path != "/health":
                operation["responses"].setdefault(
                    "401",
                    {
                        "description": ERROR_TEXT[401],
                        "content": {"application/json": {"schema": {"$ref": REF.format(model="ErrorResponse")}}},
                    },
                )


def _fill_limits(node: Any, bounds: dict[str, Any]) -> None:
    """Replace each ``x-limit`` marker with the bound it names (or drop it when the bound is unknown)."""
    if isinstance(node, list):
        for item in node:
            _fill_limits(item, bounds)
        return
    if not isinstance(node, dict):
        return
    kind = node.pop("x-limit", None)
    if kind is not None and bounds.get(kind) is not None:
        _apply(node, kind, bounds[kind])
    for value in node.values():
        _fill_limits(value, bounds)


def _apply(node: dict[str, Any], kind: str, bound: Any) -> None:
    if kind == "model":
        node["enum"] = list(bound)
    elif kind == "logit_bias":
        node["propertyNames"] = {"pattern": bound}
    elif kind in ("prompt_tokens", "prompts"):
        node["maxItems"] = bound
    elif kind == "token_id":
        node["maximum"] = bound
    else:  # choices, max_tokens, logprobs: an integer's upper bound
        node["maximum"] = min(bound, node.get("maximum", bound))


def below_pattern(limit: int) -> str:
    """A regular expression for the decimal integers 0 .. limit - 1, written without leading zeros."""
    if limit <= 0:
        return "^$"
    top = str(limit - 1)
    branches = ["0"] if top == "0" else []
    for length in range(1, len(top)):
        branches.append("[1-9]" + "[0-9]" * (length - 1) if length > 1 else "[1-9]")
    # numbers with as many digits as ``top``: a common prefix, one smaller digit, then anything
    for i, digit in enumerate(top):
        low = 1 if i == 0 else 0
        if int(digit) > low:
            branches.append(top[:i] + f"[{low}-{int(digit) - 1}]" + "[0-9]" * (len(top) - i - 1))
    branches.append(top)
    if top != "0":
        branches = [b for b in branches if b != "0"] + ["0"]
    return "^(" + "|".join(dict.fromkeys(branches)) + ")$"
