"""Tool calls out of generated text, whole or as it streams.

Formats read (``tool_choice`` ``auto``):

- Hermes-style tags, one call per tag: ``<tool_call>{"name": "f", "arguments": {...}}</tool_call>`` (what the
  built-in tool prompt asks for, and what Hermes, Qwen and Falcon-H1 templates use);
- Falcon3-Instruct's tags around a list: ``<tool_call>[{"name": "f", "arguments": {...}}, ...]</tool_call>``;
- a reply that is nothing but plain JSON: ``{"name": "f", "arguments": {...}}`` or a list of such objects.

Inside ``<tool_call>`` tags the body may also be a Python literal with single quotes, ``{'arguments': {...},
'name': 'f'}``: the schema line Falcon-H1-Instruct's template shows the model is written that way. An entry may
also be the OpenAI shape that Falcon3-Instruct's template writes earlier calls in, ``{"id": ..., "type":
"function", "function": {"name": "f", "arguments": {...}}}``.

``parameters`` is read as a synonym of ``arguments``, and arguments given as a JSON string are read too. A call
must name a declared function and carry an arguments object; otherwise its text stays ``content`` (so does a
tag whose body is not JSON). Text outside the calls is ``content``; whitespace next to a call is dropped. The
stream parser holds back text that may be the start of a ``<tool_call>`` tag (and a reply that opens with ``{``
or ``[`` until it ends), so markup never leaks into ``content``; fed a text in any pieces it gives the same calls
and content as fed it whole.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..tool_prompt import TOOL_CALL_CLOSE, TOOL_CALL_OPEN


@dataclass(frozen=True)
class ParsedCall:
    """One call: the function's name and its arguments as a JSON object string."""

    name: str
    arguments: str


Piece = str | ParsedCall  # content text, or a complete call


def _arguments(item: dict[str, Any]) -> dict[str, Any] | None:
    args = item.get("arguments", item.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return args if isinstance(args, dict) else None


def calls_from_json(value: Any, names: Sequence[str]) -> list[ParsedCall] | None:
    """Calls from a decoded ``{"name", "arguments"}`` object or a non-empty list of them; None if any entry is
    not one (or names an undeclared function)."""
    items = value if isinstance(value, list) else [value]
    if not items:
        return None
    calls = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("function"), dict) and "name" not in item:
            item = item["function"]  # the OpenAI tool_calls entry shape
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or item["name"] not in names:
            return None
        args = _arguments(item)
        if args is None:
            return None
        calls.append(ParsedCall(item["name"], json.dumps(args, ensure_ascii=False)))
    return calls


def calls_from_text(text: str, names: Sequence[str], python_literal: bool = False) -> list[ParsedCall] | None:
    """:func:`calls_from_json` of ``text`` parsed as JSON (or, with ``python_literal``, as a Python literal of
    dicts, lists, strings, numbers and booleans); None when it is neither."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        value = _python_literal(text) if python_literal else None
        if value is None:
            return None
    return calls_from_json(value, names)


MAX_LITERAL_CHARS = 65536  # a call body longer than this is not read as a Python literal


def _python_literal(text: str) -> Any:
    """``text`` as a Python literal (``ast.literal_eval``: no names, calls or operators run), or None."""
    if len(text) > MAX_LITERAL_CHARS:
        return None
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _partial_tag_length(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that is a proper start of ``tag``."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


class ToolCallParser:
    """Feed generated text with :meth:`feed` as it comes, then call :meth:`finish`; each returns the pieces
    (content strings and :class:`ParsedCall`) that became certain."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self._buffer = ""
        self._in_tag = False
        self._started = False  # the reply's first non-space character has been seen
        self._plain_json = False  # the reply opened with { or [: held to the end
        self._pending_space = ""  # whitespace-only content, sent once more content follows
        self._made_calls = False
        self._after_call = False

    def feed(self, text: str) -> list[Piece]:
        self._buffer += text
        pieces: list[Piece] = []
        while True:
            if not self._started:
                stripped = self._buffer.lstrip()
                if not stripped:
                    return pieces
                self._started = True
                self._plain_json = stripped[0] in "{["
            if self._plain_json:
                return pieces
            if self._in_tag:
                end = self._buffer.find(TOOL_CALL_CLOSE)
                if end < 0:
                    return pieces
                body, self._buffer = self._buffer[:end], self._buffer[end + len(TOOL_CALL_CLOSE) :]
                self._in_tag = False
                self._tag(body, TOOL_CALL_CLOSE, pieces)
                continue
            start = self._buffer.find(TOOL_CALL_OPEN)
            if start >= 0:
                self._content(self._buffer[:start], pieces)
                self._buffer = self._buffer[start + len(TOOL_CALL_OPEN) :]
                self._in_tag = True
                continue
            keep = _partial_tag_length(self._buffer, TOOL_CALL_OPEN)
            self._content(self._buffer[: len(self._buffer) - keep], pieces)
            self._buffer = self._buffer[len(self._buffer) - keep :]
            return pieces

    def finish(self) -> list[Piece]:
        """The rest: an unclosed tag is read as a call if its body is complete JSON (models often stop at the
        end of the call instead of closing the tag)."""
        pieces: list[Piece] = []
        rest, self._buffer = self._buffer, ""
        if self._plain_json:
            calls = calls_from_text(rest, self.names)
            if calls is not None:
                self._calls(calls, pieces)
            else:
                self._content(rest, pieces)
        elif self._in_tag:
            self._in_tag = False
            self._tag(rest, "", pieces)
        else:
            self._content(rest, pieces)
        if self._pending_space and not self._made_calls:
            pieces.append(self._pending_space)
        self._pending_space = ""
        return pieces

    def _tag(self, body: str, close: str, pieces: list[Piece]) -> None:
        calls = calls_from_text(body, self.names, python_literal=True)
        if calls is None:
            self._content(TOOL_CALL_OPEN + body + close, pieces)
        else:
            self._calls(calls, pieces)

    def _calls(self, calls: list[ParsedCall], pieces: list[Piece]) -> None:
        self._made_calls = True
        self._after_call = True
        self._pending_space = ""
        pieces.extend(calls)

    def _content(self, text: str, pieces: list[Piece]) -> None:
        """Send content, holding back trailing whitespace (dropped if a call follows) and dropping whitespace
        right after a call."""
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        body = text.rstrip()
        if body:
            pieces.append(self._pending_space + body)
            self._pending_space = ""
        self._pending_space += text[len(body) :]


def split_pieces(pieces: Iterable[Piece]) -> tuple[str | None, list[ParsedCall]]:
    """Content (None when empty) and calls of a list of pieces."""
    texts: list[str] = []
    calls: list[ParsedCall] = []
    for piece in pieces:
        if isinstance(piece, ParsedCall):
            calls.append(piece)
        else:
            texts.append(piece)
    content = "".join(texts)
    return (content or None), calls


def parse_tool_calls(text: str, names: Sequence[str]) -> tuple[str | None, list[ParsedCall]]:
    """The content and the calls of a whole reply (``tool_choice`` ``auto``)."""
    parser = ToolCallParser(names)
    return split_pieces([*parser.feed(text), *parser.finish()])


def parse_forced(text: str, mode: str, function: str | None, names: Sequence[str]) -> list[ParsedCall] | None:
    """The calls of a reply made under structured output: ``named``, the function's arguments object;
    ``required``, a list of ``{"name", "arguments"}`` objects. None when the text is not that (e.g. cut off
    by max_tokens)."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    if mode == "named":
        if not isinstance(value, dict) or function is None:
            return None
        return [ParsedCall(function, json.dumps(value, ensure_ascii=False))]
    if not isinstance(value, list):
        return None
    return calls_from_json(value, names)
