"""Requests from web pages: a key-less server refuses cross-origin simple requests, foreign Origins and foreign
Host names (DNS rebinding), and lets an allowed front end in through CORS."""

from __future__ import annotations

import httpx
import pytest

from falconlm.server.browser import allowed_host_names

from .conftest import API_KEY, MODEL_NAME, LiveServer, ServerFactory

GOOD = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 2, "temperature": 0}
FRONT_END = "https://chat.example.org"


@pytest.fixture(scope="module")
def open_server(start_server: ServerFactory) -> LiveServer:
    """No API key, one allowed front end."""
    return start_server(settings={"allowed_origins": (FRONT_END,)})


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None]
)
def test_text_plain_cross_origin_post_is_refused(open_server: LiveServer, content_type):
    """What a page can send without a preflight: refused for its Origin, and for its body type even without one."""
    body = httpx.Request("POST", "/", json=GOOD).content
    headers = {"Content-Type": content_type} if content_type else {}
    with open_server.http() as http:
        crossed = http.post("/v1/completions", content=body, headers={**headers, "Origin": "https://evil.example"})
        assert _error(crossed, 403)["code"] == "origin_not_allowed"
        no_origin = http.post("/v1/completions", content=body, headers=headers)
        assert _error(no_origin, 415)["code"] == "unsupported_media_type"
        assert http.post("/v1/completions", json=GOOD).status_code == 200


def test_form_encoded_body_still_read_when_a_key_is_required(server: LiveServer):
    """With a key a page cannot attach it to a simple request, so curl -d (form encoding) keeps working."""
    body = httpx.Request("POST", "/", json=GOOD).content
    with server.http() as http:
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        assert http.post("/v1/completions", content=body, headers=form).status_code == 200


def test_foreign_origin_cannot_read_models(open_server: LiveServer):
    with open_server.http() as http:
        assert _error(http.get("/v1/models", headers={"Origin": "http://evil.example"}), 403)
        assert _error(http.get("/v1/models", headers={"Origin": "null"}), 403)
        own = http.get("/v1/models", headers={"Origin": open_server.url})  # the server's own pages (/docs)
        assert own.status_code == 200


def test_dns_rebinding_host_is_refused(open_server: LiveServer):
    with open_server.http() as http:
        rebound = http.get("/v1/models", headers={"Host": f"evil.example:{open_server.port}"})
        assert _error(rebound, 421)["code"] == "host_not_allowed"
        assert _error(http.get("/health", headers={"Host": "attacker.test"}), 421)
        assert http.get("/v1/models", headers={"Host": f"localhost:{open_server.port}"}).status_code == 200


def test_allowed_front_end_gets_cors_headers_and_preflight(open_server: LiveServer):
    with open_server.http() as http:
        preflight = http.options(
            "/v1/chat/completions",
            headers={
                "Origin": FRONT_END,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == FRONT_END
        response = http.post("/v1/completions", json=GOOD, headers={"Origin": FRONT_END})
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == FRONT_END
        foreign = http.options(
            "/v1/models", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
        )
        assert _error(foreign, 403)


def test_keyed_server_checks_origin_too(server: LiveServer):
    headers = {"Authorization": f"Bearer {API_KEY}", "Origin": "https://evil.example"}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert _error(http.get("/v1/models", headers=headers), 403)


@pytest.mark.parametrize(
    ("bind", "host", "allowed"),
    [
        ("127.0.0.1", "localhost", True),
        ("127.0.0.1", "127.0.0.1", True),
        ("127.0.0.1", "[::1]", True),
        ("127.0.0.1", "app.localhost", True),
        ("127.0.0.1", "evil.example", False),
        ("::1", "[::1]", True),
        ("10.0.0.5", "10.0.0.5", True),
        ("10.0.0.5", "localhost", False),
    ],
)
def test_allowed_host_names_follow_the_bound_address(bind, host, allowed):
    names, any_ip = allowed_host_names(bind)
    assert not any_ip
    matched = host in names or any(n.startswith("*.") and host.endswith(n[1:]) for n in names)
    assert matched == allowed


def test_wildcard_bind_accepts_addresses_and_listed_names_only():
    names, any_ip = allowed_host_names("0.0.0.0", ["api.example.org"])
    assert any_ip and "api.example.org" in names and "localhost" in names
    assert "evil.example" not in names
