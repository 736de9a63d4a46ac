"""Bearer API keys: every route except /health needs ``Authorization: Bearer KEY`` when keys are set."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from ..serving.errors import APIError
from .errors import error_response

PUBLIC_PATHS = frozenset({"/health"})


def key_matches(header: str | None, keys: Iterable[bytes]) -> bool:
    """True when ``header`` is ``Bearer <key>`` for one of ``keys`` (constant-time, case-sensitive key)."""
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    candidate = token.strip().encode("utf-8")
    matched = False
    for key in keys:  # no early exit: the time does not depend on which key matched
        matched |= hmac.compare_digest(candidate, key)
    return matched


class APIKeyMiddleware:
    """Pure ASGI middleware answering 401 (an OpenAI error object) for a missing or wrong key."""

    def __init__(self, app: ASGIApp, api_keys: Iterable[str]) -> None:
        self.app = app
        self.keys = [key.encode("utf-8") for key in api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization")
        if key_matches(header, self.keys):
            await self.app(scope, receive, send)
            return
        message = "missing API key: send 'Authorization: Bearer KEY'" if not header else "invalid API key"
        error = APIError(401, message, headers={"WWW-Authenticate": "Bearer"})
        await error_response(error)(scope, receive, send)
