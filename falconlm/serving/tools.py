"""Tool calling for ``/v1/chat/completions``: check ``tools``/``tool_choice``, and decide what the request does.

- ``auto``: the tools go to the chat template; the reply is parsed for calls (``tool_parsers``).
- ``none``: the tools still go to the template (as vLLM does), the reply is plain content.
- ``required`` / a named function: enforced with structured output. A named function's reply is its arguments
  object (the function's ``parameters`` schema); ``required`` replies with a JSON array of
  ``{"name": ..., "arguments": {...}}`` objects, one schema branch per function, at least one call (exactly one
  when ``parallel_tool_calls`` is false). vLLM does the same.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

import jsonschema

from .errors import bad_request
from .protocol import TOOL_NAME_PATTERN, ChatCompletionRequest, ChatCompletionTool, NamedToolChoice

# Part of every 400 for tools and tool_choice that do not fit together or with a response_format: the request's
# fields are each valid, but not together, which no schema states (the OpenAPI contract test allows this phrase).
TOOLS_MISMATCH_PHRASE = "conflicts with the request's"
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request does with its tools.

    ``tools``: the tool dicts for the chat template (None without tools). ``mode``: ``none``, ``auto``,
    ``required`` or ``named``. ``function``: the named function. ``schema``: the JSON schema that structured
    output enforces (``required`` and ``named``), built from ``schema_param``. ``names``: the declared function
    names."""

    tools: list[dict[str, Any]] | None
    mode: str
    names: tuple[str, ...] = ()
    function: str | None = None
    schema: dict[str, Any] | None = None
    schema_param: str | None = None

    @property
    def parses_calls(self) -> bool:
        return self.mode != "none"


NO_TOOLS = ToolPlan(tools=None, mode="none")


def new_tool_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def _check_tool(index: int, tool: ChatCompletionTool) -> None:
    where = f"tools[{index}]"
    if tool.type != "function":
        raise bad_request(f"{where}.type must be 'function', got {tool.type!r}", f"{where}.type")
    name = tool.function.name
    if not re.fullmatch(TOOL_NAME_PATTERN, name):
        raise bad_request(
            f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-'; got {name!r}", f"{where}.function.name"
        )
    parameters = tool.function.parameters
    if parameters is None:
        return
    param = f"{where}.function.parameters"
    try:
        jsonschema.validators.validator_for(parameters, default=jsonschema.Draft202012Validator).check_schema(
            parameters
        )
    except jsonschema.SchemaError as exc:
        where = "".join(f"[{p!r}]" for p in exc.path)
        at = f" at {where}" if where else ""
        raise bad_request(f"{param} is not a valid JSON Schema{at}: {exc.message}", param) from exc
    if parameters.get("type", "object") != "object":
        raise bad_request(f"{param} must describe an object (type 'object'), got type {parameters['type']!r}", param)


def _parameters(tool: ChatCompletionTool) -> dict[str, Any]:
    return tool.function.parameters if tool.function.parameters is not None else EMPTY_PARAMETERS


def required_schema(tools: list[ChatCompletionTool], parallel: bool) -> dict[str, Any]:
    """The schema of a ``required`` reply: an array of calls, each one function's name and arguments."""
    branches = [
        {
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [t.function.name]}, "arguments": _parameters(t)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    items = branches[0] if len(branches) == 1 else {"anyOf": branches}
    schema: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def plan_tools(request: ChatCompletionRequest) -> ToolPlan:
    """Check the request's tools and tool_choice (400 naming the field) and say what to do with them."""
    tools = request.tools or []
    for index, tool in enumerate(tools):
        _check_tool(index, tool)
    names = tuple(t.function.name for t in tools)
    for index, name in enumerate(names):
        if name in names[:index]:
            raise bad_request(
                f"tools[{index}].function.name {name!r} {TOOLS_MISMATCH_PHRASE} tools: it is declared twice",
                f"tools[{index}].function.name",
            )
    choice = request.tool_choice
    if choice is None:
        mode = "auto" if tools else "none"
    elif isinstance(choice, NamedToolChoice):
        mode = "named"
    else:
        mode = choice
        if mode not in ("none", "auto", "required"):
            raise bad_request(
                f"tool_choice must be 'none', 'auto', 'required' or a named function, got {mode!r}", "tool_choice"
            )
    if not tools:
        if mode != "none":
            raise bad_request(f"tool_choice {mode!r} {TOOLS_MISMATCH_PHRASE} tools: there are none", "tool_choice")
        return NO_TOOLS
    template_tools = [t.model_dump(exclude_none=True) for t in tools]
    if isinstance(choice, NamedToolChoice):
        if choice.type != "function":
            raise bad_request(f"tool_choice.type must be 'function', got {choice.type!r}", "tool_choice.type")
        name = choice.function.name
        if name not in names:
            raise bad_request(
                f"tool_choice names the function {name!r}, which {TOOLS_MISMATCH_PHRASE} tools: they declare "
                f"{', '.join(names)}",
                "tool_choice.function.name",
            )
        index = names.index(name)
        param = f"tools[{index}].function.parameters"
        return ToolPlan(template_tools, "named", names, name, _parameters(tools[index]), param)
    if mode == "required":
        parallel = request.parallel_tool_calls is not False
        return ToolPlan(template_tools, "required", names, None, required_schema(tools, parallel), "tools")
    return ToolPlan(template_tools, mode, names)
