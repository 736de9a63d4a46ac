"""The OpenAI-compatible HTTP server: ``build_app(engine, settings)`` over an AsyncEngine."""

from ..serving.settings import ServerSettings
from .app import Mount, build_app

__all__ = ["Mount", "ServerSettings", "build_app"]
