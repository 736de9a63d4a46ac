"""Requests from web pages: the Host allow-list (DNS rebinding), the Origin check, and CORS for real front ends.

A page the user visits can send "simple" cross-origin requests to a local server, and with DNS rebinding it can
read the answers. Three checks stop it, each answering with an OpenAI error object:

- ``Host`` must name the server: the bound address, localhost names when bound to loopback, any IP address or
  this machine's name when bound to every interface, or a name in ``--allowed-hosts`` (Starlette's
  TrustedHostMiddleware does the matching). Otherwise 421.
- ``Origin``, when a browser sends one, must be the server itself or one of ``--allowed-origins``. Otherwise 403.
- A body on a JSON route must say ``Content-Type: application/json`` (``body.py``, 415).

CORS headers for allowed origins come from Starlette's CORSMiddleware.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from starlette._utils import parse_host_header
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..serving.errors import APIError
from .errors import error_response

LOOPBACK_NAMES = ("localhost", "*.localhost", "127.0.0.1", "[::1]")
WILDCARD_ADDRESSES = frozenset({"", "0.0.0.0", "::"})


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(name: str) -> str:
    """A name as the Host header spells it: lower case, IPv6 addresses in brackets."""
    name = name.strip().strip("[]").lower()
    return f"[{name}]" if ":" in name else name


def allowed_host_names(bind_host: str, extra: Iterable[str] = ()) -> tuple[list[str], bool]:
    """The Host names the server answers, and whether any IP address is fine too (bound to every interface)."""
    names = [_host_name(name) for name in extra if name.strip()]
    host = _host_name(bind_host)
    if host.strip("[]") in WILDCARD_ADDRESSES:
        machine = socket.gethostname().lower()
        return [*names, *LOOPBACK_NAMES, machine, f"{machine.split('.')[0]}"], True
    if _is_loopback(host):
        return [*names, *LOOPBACK_NAMES, host], False
    return [*names, host], False


class HostCheckMiddleware:
    """421 (an OpenAI error object) for a Host header that does not name this server.

    The matching is Starlette's TrustedHostMiddleware; this wrapper adds "any IP address" for a server bound to
    every interface (an address cannot be rebound to another site) and turns its plain-text refusal into JSON.
    """

    def __init__(self, app: ASGIApp, bind_host: str, allowed_hosts: Iterable[str] = ()) -> None:
        self.app = app
        names, self.any_ip = allowed_host_names(bind_host, allowed_hosts)
        self.allow_any = "*" in names
        self.trusted = TrustedHostMiddleware(self._accepted, allowed_hosts=names, www_redirect=False)

    async def _accepted(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["falconlm.host_ok"] = True
        await self.app(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.allow_any:
            await self.app(scope, receive, send)
            return
        host = Headers(scope=scope).get("host")
        parsed = parse_host_header(host)
        if parsed is not None and self.any_ip and _is_ip(parsed.host):
            await self.app(scope, receive, send)
            return

        async def refused_send(message: Message) -> None:  # swallow TrustedHostMiddleware's plain-text answer
            if scope.get("falconlm.host_ok"):
                await send(message)

        await self.trusted(scope, receive, refused_send)
        if not scope.get("falconlm.host_ok"):
            error = APIError(
                421,
                f"the Host header {host!r} does not name this server; add the name to --allowed-hosts to use it",
                code="host_not_allowed",
            )
            await error_response(error)(scope, receive, send)


class OriginCheckMiddleware:
    """403 for a request whose Origin is neither this server nor one of ``allowed_origins`` (``*``: any)."""

    def __init__(self, app: ASGIApp, allowed_origins: Iterable[str] = ()) -> None:
        self.app = app
        self.origins = frozenset(origin.rstrip("/").lower() for origin in allowed_origins)
        self.allow_any = "*" in self.origins

    def allowed(self, origin: str, scope: Scope) -> bool:
        origin = origin.rstrip("/").lower()
        if self.allow_any or origin in self.origins:
            return True
        host = Headers(scope=scope).get("host", "").lower()
        return bool(host) and origin == f"{scope.get('scheme', 'http')}://{host}"  # the server's own pages

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        origin = Headers(scope=scope).get("origin") if scope["type"] == "http" else None
        if origin is None or self.allowed(origin, scope):
            await self.app(scope, receive, send)
            return
        error = APIError(
            403,
            f"requests from web pages at {origin!r} are not allowed; start the server with --allowed-origins to "
            "let a front end call it",
            code="origin_not_allowed",
        )
        await error_response(error)(scope, receive, send)


def install_browser_checks(app, bind_host: str, allowed_hosts: Iterable[str], allowed_origins: Iterable[str]) -> None:
    """Add CORS, the Origin check and the Host check, outermost last (Host, then Origin, then CORS run first)."""
    origins = [origin.rstrip("/") for origin in allowed_origins]
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Retry-After"],
        )
    app.add_middleware(OriginCheckMiddleware, allowed_origins=origins)
    app.add_middleware(HostCheckMiddleware, bind_host=bind_host, allowed_hosts=tuple(allowed_hosts))
