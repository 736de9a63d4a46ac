"""Falcon3-Instruct's and Falcon-H1-Instruct's published chat templates (``tests/fixtures/chat_templates``):
our tokenizer renders them as transformers does, for plain chat and for chats with tools, tool calls and tool
results, and our tool-call parser reads the call formats those templates teach the model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

from falconlm.serving.tool_parsers import ParsedCall, ToolCallParser, parse_tool_calls, split_pieces
from falconlm.tokenizer import Tokenizer
from falconlm.tool_prompt import tool_call_text

transformers = pytest.importorskip("transformers")

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
FALCON3 = "falcon3-instruct.tokenizer_config.json"
H1 = "falcon-h1-instruct.tokenizer_config.json"
SPECIAL = ["<|endoftext|>", "<|pad|>", "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city, now.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]
PLAIN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi! ¿Qué tal?"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Two plus two?"},
]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
WITH_TOOLS = [
    {"role": "system", "content": "Use tools when they help."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    {"role": "assistant", "content": "21 °C."},
    {"role": "user", "content": "And the time?"},
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tokenizer folder per template: a byte-level vocabulary (no shared data) with the special tokens the
    templates use, and the fixture's tokenizer_config.json."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = BackendTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL)
    out = {}
    for name in (FALCON3, H1):
        folder = tmp_path_factory.mktemp(name.split(".")[0])
        backend.save(str(folder / "tokenizer.json"))
        shutil.copy(TEMPLATES / name, folder / "tokenizer_config.json")
        out[name] = folder
    return out


def ours(folder: Path, messages: list[dict], tools: list[dict] | None = None) -> str:
    return Tokenizer.from_pretrained(folder).apply_chat_template(messages, add_generation_prompt=True, tools=tools)


def reference(folder: Path, messages: list[dict], tools: list[dict] | None = None) -> str:
    """transformers' rendering, tool-call arguments given as objects (as its chat-template docs ask)."""
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
    messages = json.loads(json.dumps(messages))
    for message in messages:
        for call in message.get("tool_calls", []):
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("name", [FALCON3, H1])
def test_plain_chat_renders_as_transformers(folders: dict[str, Path], name: str) -> None:
    text = ours(folders[name], PLAIN)
    assert text == reference(folders[name], PLAIN)
    assert "Two plus two?" in text and "Hi! ¿Qué tal?" in text


def test_falcon3_tools_calls_and_results_render_as_transformers(folders: dict[str, Path]) -> None:
    text = ours(folders[FALCON3], WITH_TOOLS, TOOLS)
    assert text == reference(folders[FALCON3], WITH_TOOLS, TOOLS)
    # The template writes the tools, the earlier call (OpenAI shape) and the tool's answer itself.
    assert '"name": "get_weather"' in text and '<tool_response>\n{"temp_c": 21}\n</tool_response>' in text
    assert text.endswith("<|user|>\nAnd the time?\n<|assistant|>\n")


def test_h1_tools_and_results_render_as_transformers(folders: dict[str, Path]) -> None:
    """H1's template writes tools and tool messages but never an assistant's ``tool_calls``: rendered as
    published, the earlier call would vanish from the prompt. We write it into the turn's text in the
    ``<tool_call>`` format the template teaches, so the rendering equals transformers' for the same chat with
    the call written into the content."""
    text = ours(folders[H1], WITH_TOOLS, TOOLS)
    written = [dict(m) for m in WITH_TOOLS]
    written[2] = {"role": "assistant", "content": tool_call_text(CALL)}
    assert text == reference(folders[H1], written, TOOLS)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert text.startswith("<|begin_of_text|><|im_start|>system\nUse tools when they help.\n\n")
    assert '[{"type": "function", "function": {"name": "get_weather"' in text
    assert '<|im_start|>tool\n{"temp_c": 21}<|im_end|>' in text


@pytest.mark.parametrize("name", [FALCON3, H1])
def test_templates_without_tools_match_with_an_empty_tool_list(folders: dict[str, Path], name: str) -> None:
    """An empty ``tools`` list is no tools: the plain branch, as in transformers."""
    assert ours(folders[name], PLAIN, []) == reference(folders[name], PLAIN, None)


# ---- the call formats the templates teach ---------------------------------------------------------------------
NAMES = ["get_weather", "get_time"]
WEATHER = ParsedCall("get_weather", '{"city": "Paris"}')
TIME = ParsedCall("get_time", "{}")


def streamed(text: str, size: int) -> tuple[str | None, list[ParsedCall]]:
    parser = ToolCallParser(NAMES)
    pieces = [piece for i in range(0, len(text), size) for piece in parser.feed(text[i : i + size])]
    return split_pieces([*pieces, *parser.finish()])


@pytest.mark.parametrize(
    "reply",
    [
        # Falcon3-Instruct: a JSON list inside one tag, indented as in the template's example.
        '<tool_call>\n[\n  {"name": "get_weather", "arguments": {"city": "Paris"}},\n'
        '  {"name": "get_time", "arguments": {}}\n]\n</tool_call>',
        # The shape Falcon3's template writes earlier calls in (tool_calls | tojson).
        '<tool_call>\n[{"id": "call_1", "type": "function", "function": {"name": "get_weather", '
        '"arguments": {"city": "Paris"}}}, {"type": "function", "function": {"name": "get_time", "arguments": {}}}]'
        "\n</tool_call>",
        # Falcon-H1-Instruct: one object per tag, arguments first, as its schema line; JSON or a Python literal.
        '<tool_call>\n{"arguments": {"city": "Paris"}, "name": "get_weather"}\n</tool_call>\n'
        "<tool_call>\n{'arguments': {}, 'name': 'get_time'}\n</tool_call>",
    ],
)
def test_parser_reads_the_taught_formats_whole_and_streamed(reply: str) -> None:
    for parse in (lambda t: parse_tool_calls(t, NAMES), lambda t: streamed(t, 3), lambda t: streamed(t, 1)):
        assert parse(reply) == (None, [WEATHER, TIME])


def test_python_literal_bodies_stay_content_when_not_a_call() -> None:
    """Only literals run (no names, calls or operators), and a body that is no declared call stays text."""
    for body in ("{'name': __import__('os').getcwd(), 'arguments': {}}", "{'name': 'rm_rf', 'arguments': {}}"):
        text = f"<tool_call>{body}</tool_call>"
        assert parse_tool_calls(text, NAMES) == (text, [])
