"""A chat choice's reply as tool calls: the whole message, or OpenAI-style deltas as it streams.

Streamed, a call's first delta carries ``index``, ``id``, ``type`` and ``function.name``; later ones carry
``function.arguments`` fragments. With ``auto`` a call is sent once its text is complete (its name, then its
arguments); with a named ``tool_choice`` the name goes first and the arguments stream as they are generated;
with ``required`` the calls are sent when the reply ends (the JSON list is only then complete).
"""

from __future__ import annotations

from .protocol import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall
from .tool_parsers import ParsedCall, ToolCallParser, parse_forced, parse_tool_calls, split_pieces
from .tools import ToolPlan, new_tool_call_id

TOOL_CALLS_FINISH = "tool_calls"


def finish_reason(reason: str | None, made_calls: bool) -> str | None:
    """``tool_calls`` for a reply that ended normally with calls; other reasons (length, abort) stay."""
    return TOOL_CALLS_FINISH if made_calls and reason == "stop" else reason


def reply_message(plan: ToolPlan, text: str) -> tuple[str | None, list[ToolCall]]:
    """The content and tool calls of a whole reply; a reply whose calls do not parse is all content."""
    if plan.mode == "auto":
        content, calls = parse_tool_calls(text, plan.names)
    else:
        forced = parse_forced(text, plan.mode, plan.function, plan.names)
        content, calls = (None, forced) if forced else (text, [])
    tool_calls = [
        ToolCall(id=new_tool_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls
    ]
    return content, tool_calls


class ToolDeltas:
    """One streamed choice: :meth:`feed` each text delta, then :meth:`finish`; both give ``(content, deltas)``."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.num_calls = 0
        self._parser = ToolCallParser(plan.names) if plan.mode == "auto" else None
        self._text = ""

    @property
    def made_calls(self) -> bool:
        return self.num_calls > 0

    def feed(self, text: str) -> tuple[str | None, list[DeltaToolCall]]:
        if self._parser is not None:
            return self._from_pieces(self._parser.feed(text))
        if self.plan.mode == "named":
            return None, self._named(text)
        self._text += text
        return None, []

    def finish(self) -> tuple[str | None, list[DeltaToolCall]]:
        if self._parser is not None:
            return self._from_pieces(self._parser.finish())
        if self.plan.mode == "named":
            return None, []
        calls = parse_forced(self._text, self.plan.mode, self.plan.function, self.plan.names)
        if calls is None:
            return self._text or None, []
        return None, [delta for call in calls for delta in self._call(call)]

    def _named(self, text: str) -> list[DeltaToolCall]:
        if not text:
            return []
        if not self.made_calls:
            self.num_calls = 1
            header = DeltaFunctionCall(name=self.plan.function, arguments="")
            first = DeltaToolCall(index=0, id=new_tool_call_id(), type="function", function=header)
            return [first, DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))]
        return [DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))]

    def _call(self, call: ParsedCall) -> list[DeltaToolCall]:
        index = self.num_calls
        self.num_calls += 1
        header = DeltaFunctionCall(name=call.name, arguments="")
        return [
            DeltaToolCall(index=index, id=new_tool_call_id(), type="function", function=header),
            DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=call.arguments)),
        ]

    def _from_pieces(self, pieces: list) -> tuple[str | None, list[DeltaToolCall]]:
        content, calls = split_pieces(pieces)
        return content, [delta for call in calls for delta in self._call(call)]
