"""Tools in chat prompts, for templates that do not handle them.

A chat template that knows about tools (Falcon3-Instruct's, Falcon-H1's, Qwen's, Hermes') gets them as the
``tools`` variable, as Hugging Face's ``apply_chat_template(tools=...)`` passes them, and renders them itself.
A template that does not (the built-in Falcon ``User:``/``Falcon:`` one, or a Jinja template that never reads
``tools``) gets them through :func:`tool_system_prompt`: a system message listing the functions (one JSON line each) and
asking for calls in the Hermes format, one tag per call::

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

Earlier tool calls and tool results are folded into text the same way for templates that cannot render them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def _decoded(arguments: Any) -> Any:
    """Arguments sent as a JSON string, decoded; anything else (or a string that is not JSON) as it is."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def tool_system_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """The system text that tells a model without a tool-aware template which functions it may call and how.

    Kept short: one JSON line per function (name, description, parameters), then the call format."""
    lines = ["Functions you may call:"]
    for tool in tools:
        function = tool.get("function", tool)
        entry = {"name": function.get("name")}
        if function.get("description"):
            entry["description"] = function["description"]
        entry["parameters"] = function.get("parameters") or {"type": "object", "properties": {}}
        lines.append(_compact(entry))
    lines.append(f'To call one, reply with {TOOL_CALL_OPEN}{{"name": ..., "arguments": {{...}}}}{TOOL_CALL_CLOSE}.')
    return "\n".join(lines)


def tool_call_text(tool_call: Mapping[str, Any]) -> str:
    """An earlier OpenAI ``tool_calls`` entry written in the Hermes format the prompt asks for."""
    function = tool_call.get("function", tool_call)
    arguments = _decoded(function.get("arguments"))
    return f"{TOOL_CALL_OPEN}{_compact({'name': function.get('name'), 'arguments': arguments})}{TOOL_CALL_CLOSE}"


def tool_response_text(content: str) -> str:
    return f"{TOOL_RESPONSE_OPEN}{content}{TOOL_RESPONSE_CLOSE}"


def template_reads(source: str | None, word: str) -> bool:
    """Whether a Jinja chat template mentions ``word`` (``tools``, ``tool_calls``, ``tool``): the same test
    as whether it can render that part of a chat itself."""
    return source is not None and word in source


def fold_tools_into_messages(
    messages: list[dict[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    *,
    inject_tools: bool,
    fold_tool_calls: bool,
    fold_tool_role: bool,
) -> list[dict[str, Any]]:
    """Messages a template without tool support can render.

    ``inject_tools``: the tool system prompt goes into the first system message (one is added when there is
    none). ``fold_tool_calls``: an assistant message's ``tool_calls`` become text after its content.
    ``fold_tool_role``: ``tool`` messages become ``user`` messages holding ``<tool_response>...``."""
    out: list[dict[str, Any]] = []
    for message in messages:
        message = dict(message)
        if fold_tool_calls and message.get("role") == "assistant" and message.get("tool_calls"):
            calls = "".join(tool_call_text(call) for call in message.pop("tool_calls"))
            message["content"] = (message.get("content") or "") + calls
        if fold_tool_role and message.get("role") == "tool":
            message = {"role": "user", "content": tool_response_text(message.get("content") or "")}
        out.append(message)
    if inject_tools and tools:
        prompt = tool_system_prompt(tools)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n{prompt}" if out[0]["content"] else prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def arguments_as_objects(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assistant ``tool_calls`` with ``function.arguments`` parsed from its JSON string into an object, as
    tool-aware templates (``arguments | tojson``) expect; arguments that are not JSON stay a string."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            fixed = []
            for call in calls:
                call = dict(call)
                function = dict(call.get("function") or {})
                if "arguments" in function:
                    function["arguments"] = _decoded(function["arguments"])
                call["function"] = function
                fixed.append(call)
            message = {**message, "tool_calls": fixed}
        out.append(message)
    return out
