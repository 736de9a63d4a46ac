"""Request bodies over HTTP: the Content-Type check, then the checked JSON of ``falconlm.serving.json_body``.

Without API keys a JSON route needs ``Content-Type: application/json`` (415 otherwise): a web page can send
text/plain, form or multipart bodies cross-origin without asking, never JSON. With keys the browser cannot attach
the key to such a request, so the type is not checked and ``curl -d`` (form encoding) keeps working.
"""

from __future__ import annotations

from starlette.requests import Request

from ..serving.errors import APIError
from ..serving.json_body import ModelT, parse_json, validate


def is_json_type(content_type: str | None) -> bool:
    """True for ``application/json`` and ``application/*+json``, with or without parameters."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_json(request: Request, model: type[ModelT], require_json_type: bool = False) -> ModelT:
    """The body as ``model``; 415 for a non-JSON Content-Type when ``require_json_type``, 400 for bad bodies."""
    content_type = request.headers.get("content-type")
    if require_json_type and not is_json_type(content_type):
        raise APIError(
            415,
            f"send the body as JSON with 'Content-Type: application/json' (got {content_type or 'no Content-Type'})",
            code="unsupported_media_type",
        )
    return validate(parse_json(await request.body()), model)
