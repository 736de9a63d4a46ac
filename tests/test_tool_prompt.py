"""Tools in chat prompts: a tool-aware Jinja template gets ``tools`` (and tool calls with object arguments); the
built-in template and templates that never read tools get the tool system prompt and folded tool messages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from falconlm import default_model_path
from falconlm.tokenizer import Tokenizer
from falconlm.tool_prompt import tool_system_prompt

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]

# A Hermes/Qwen-style template that handles tools, tool calls and tool results itself.
TOOL_TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }}={{ t.function.parameters | tojson }};"
    "{% endfor %}</tools>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}<response id={{ m.tool_call_id }}>{{ m.content }}</response>\n"
    "{% elif m.tool_calls %}<calls>{% for c in m.tool_calls %}{{ c.function.name }}"
    "{{ c.function.arguments | tojson }}{% endfor %}</calls>\n"
    "{% else %}<{{ m.role }}>{{ m.content }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
# A template that knows nothing of tools (and raises on roles it does not know, as many do).
PLAIN_TEMPLATE = (
    "{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m.role) }}{% endif %}"
    "<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    shutil.copyfile(default_model_path() / "tokenizer.json", tmp_path / "tokenizer.json")
    return tmp_path


def with_template(folder: Path, template: str | None) -> Tokenizer:
    config = {"eos_token": "<|endoftext|>"} | ({"chat_template": template} if template else {})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_pretrained(folder)


def test_builtin_template_injects_the_tool_prompt_and_folds_tool_messages(folder: Path):
    tok = with_template(folder, None)
    prompt = tok.apply_chat_template(CHAT, tools=TOOLS)
    assert prompt == (
        f"System: {tool_system_prompt(TOOLS)}\n"
        "User: Weather in Paris?\n"
        'Falcon: <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
        "Tool: sunny, 21 C\n"
        "Falcon:"
    )
    assert json.dumps(TOOLS[0]["function"]["parameters"]) in prompt and "<tool_call>" in tool_system_prompt(TOOLS)
    with_system = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, *CHAT[:1]], tools=TOOLS)
    assert with_system.startswith(f"System: Be brief.\n{tool_system_prompt(TOOLS)}\nUser: ")
    assert tok.apply_chat_template(CHAT[:1]) == "User: Weather in Paris?\nFalcon:"  # no tools, no prompt


def test_tool_aware_template_gets_tools_and_object_arguments(folder: Path):
    tok = with_template(folder, TOOL_TEMPLATE)
    prompt = tok.apply_chat_template(CHAT, tools=TOOLS)
    parameters = json.dumps(TOOLS[0]["function"]["parameters"], ensure_ascii=False)
    assert prompt == (
        f"<tools>get_weather={parameters};</tools>\n"
        "<user>Weather in Paris?\n"
        '<calls>get_weather{"city": "Paris"}</calls>\n'
        "<response id=call_1>sunny, 21 C</response>\n"
        "<assistant>"
    )
    assert "Functions you may call" not in prompt
    assert tok.apply_chat_template(CHAT[:1]) == "<user>Weather in Paris?\n<assistant>"


def test_template_without_tool_support_gets_them_as_messages(folder: Path):
    tok = with_template(folder, PLAIN_TEMPLATE)
    prompt = tok.apply_chat_template(CHAT, tools=TOOLS)
    assert prompt == (
        f"<system>{tool_system_prompt(TOOLS)}\n"
        "<user>Weather in Paris?\n"
        '<assistant><tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
        "<user><tool_response>sunny, 21 C</tool_response>\n"
        "<assistant>"
    )


def test_arguments_that_are_not_json_stay_a_string(folder: Path):
    tok = with_template(folder, TOOL_TEMPLATE)
    bad = {**CALL, "function": {"name": "get_weather", "arguments": "city=Paris"}}
    prompt = tok.apply_chat_template([CHAT[0], {"role": "assistant", "tool_calls": [bad]}], tools=TOOLS)
    assert '<calls>get_weather"city=Paris"</calls>' in prompt


def test_tool_role_and_content_free_assistant_accepted(folder: Path):
    tok = with_template(folder, None)
    assert "Tool: 42" in tok.apply_chat_template([{"role": "tool", "content": "42"}])
    with pytest.raises(ValueError, match="no 'content'"):
        tok.apply_chat_template([{"role": "assistant"}])
