"""The OpenAI-compatible HTTP server: ``build_app(engine, settings)`` over an AsyncEngine."""

from .app import build_app
from .settings import ServerSettings

__all__ = ["ServerSettings", "build_app"]
