"""Bounded chat-template rendering: an output-length cap and a render-time limit, on top of Jinja's sandbox.

The sandbox stops templates from reaching Python internals; it does not stop one from looping for minutes or
building a huge string out of a request's messages. :func:`render_bounded` streams the output and stops past
``max_chars``; a trace hook on the template's own frames stops it past ``timeout`` seconds (the hook only
watches frames compiled from the template, so the rest of the process runs untraced). Big ``*`` and ``**``
results are refused before they are built (:class:`BoundedSandbox`).
"""

from __future__ import annotations

import sys
import time
from types import FrameType
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_RENDER_CHARS = 1 << 22  # 4 Mi characters: far above any real chat prompt
MAX_RENDER_SECONDS = 5.0
_MAX_EXPONENT = 1024


class TemplateLimitError(ValueError):
    """A chat template went past its output or time limit."""


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, refusing ``*`` results over MAX_RENDER_CHARS items and huge powers."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                sized = isinstance(seq, str | list | tuple) and isinstance(times, int)
                if sized and len(seq) * times > MAX_RENDER_CHARS:
                    raise TemplateLimitError(f"chat template builds a sequence over {MAX_RENDER_CHARS} items")
        if operator == "**" and isinstance(right, int) and abs(right) > _MAX_EXPONENT:
            raise TemplateLimitError(f"chat template raises to a power over {_MAX_EXPONENT}")
        return super().call_binop(context, operator, left, right)


def render_bounded(
    template: jinja2.Template,
    context: dict[str, Any],
    max_chars: int = MAX_RENDER_CHARS,
    timeout: float = MAX_RENDER_SECONDS,
) -> str:
    """``template`` rendered with ``context``; TemplateLimitError past ``max_chars`` or ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    filename = "<template>"  # the file name jinja gives the code of a template made from a string

    def local_trace(frame: FrameType, event: str, arg: Any):
        if time.monotonic() > deadline:
            raise TemplateLimitError(f"chat template took longer than {timeout:g} s to render")
        return local_trace

    def global_trace(frame: FrameType, event: str, arg: Any):
        return local_trace if frame.f_code.co_filename == filename else None

    previous = sys.gettrace()
    sys.settrace(global_trace)
    try:
        parts: list[str] = []
        size = 0
        for chunk in template.generate(**context):
            size += len(chunk)
            if size > max_chars:
                raise TemplateLimitError(f"chat template output is over {max_chars} characters")
            parts.append(chunk)
        return "".join(parts)
    finally:
        sys.settrace(previous)
