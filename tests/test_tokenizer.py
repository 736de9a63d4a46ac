"""Tokenizer: llama.cpp's Falcon test vectors, special tokens, chat templates, loading errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

from falconlm.tokenizer import Tokenizer

VECTOR_MARKER = "\n__ggml_vocab_test__\n"
SPECIAL_TOKENS = [
    ">>TITLE<<",
    ">>ABSTRACT<<",
    ">>INTRODUCTION<<",
    ">>SUMMARY<<",
    ">>COMMENT<<",
    ">>ANSWER<<",
    ">>QUESTION<<",
    ">>DOMAIN<<",
    ">>PREFIX<<",
    ">>SUFFIX<<",
    ">>MIDDLE<<",
    "<|endoftext|>",
]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
]


@pytest.fixture(scope="module")
def falcon(falcon_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(falcon_tokenizer_dir)


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    """A byte-level tokenizer folder with no merges (one id per byte) and an eos token; no shared data."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = BackendTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>"])
    folder = tmp_path / "tiny"
    folder.mkdir()
    backend.save(str(folder / "tokenizer.json"))
    return folder


def with_template(folder: Path, template: object, **config: object) -> Tokenizer:
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, **config}))
    return Tokenizer.from_pretrained(folder)


def load_vectors(folder: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's pairs: inputs end with a marker line; outputs are one line of ids per input."""
    inputs = (folder / "ggml-vocab-falcon.gguf.inp").read_text(encoding="utf-8").split(VECTOR_MARKER)
    assert inputs[-1] == "", "the .inp file ends with a marker line"
    inputs = inputs[:-1]
    lines = (folder / "ggml-vocab-falcon.gguf.out").read_text(encoding="utf-8").split("\n")
    if lines[-1] == "":
        lines = lines[:-1]
    assert len(lines) == len(inputs), (len(lines), len(inputs))
    return [(text, [int(tok) for tok in line.split()]) for text, line in zip(inputs, lines, strict=True)]


# ---------------------------------------------------------------------- the real Falcon tokenizer


def test_llama_cpp_vectors_reproduce(falcon: Tokenizer, falcon_tokenizer_dir: Path) -> None:
    vectors = load_vectors(falcon_tokenizer_dir)
    assert len(vectors) == 46
    wrong = [(text, ids, falcon.encode(text)) for text, ids in vectors if falcon.encode(text) != ids]
    assert not wrong, wrong
    unround = [text for text, ids in vectors if falcon.decode(ids) != text]
    assert not unround, unround


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("Hello world", [9856, 1079]),
        ("", []),
        ("  Hello", [204, 23090]),
        (" (", [204, 19]),
        ("333333333", [22287, 22287, 22287]),
    ],
)
def test_spec_examples(falcon: Tokenizer, text: str, ids: list[int]) -> None:
    assert falcon.encode(text) == ids


def test_vocabulary_facts(falcon: Tokenizer) -> None:
    assert falcon.vocab_size == 65024
    assert falcon.eos_token == "<|endoftext|>"
    assert falcon.eos_token_id == 11
    assert falcon.bos_token_id is None  # the Falcon tokenizer files name no bos token
    assert falcon.all_special_ids == list(range(12))
    assert [falcon.id_to_token(i) for i in range(12)] == SPECIAL_TOKENS
    assert falcon.token_to_id(">>QUESTION<<") == 6
    assert falcon.token_to_id("no such token") is None
    assert falcon.backend.get_vocab_size() == 65024


@pytest.mark.parametrize("special_id", range(12))
def test_special_tokens_are_never_split(falcon: Tokenizer, special_id: int) -> None:
    special = SPECIAL_TOKENS[special_id]
    assert falcon.encode(special) == [special_id]
    for text in (f"a{special}b", f" {special} ", f"{special}{special}", f"x>{special}<"):
        ids = falcon.encode(text)
        assert ids.count(special_id) == text.count(special), (text, ids)
        assert falcon.decode(ids) == text


def test_special_tokens_in_prose(falcon: Tokenizer) -> None:
    ids = falcon.encode(">>QUESTION<<What is 2+2?>>ANSWER<<4<|endoftext|>")
    assert ids[0] == 6 and ids[-1] == 11 and 5 in ids
    assert falcon.decode(ids, skip_special_tokens=True) == "What is 2+2?4"


def test_bytes_without_a_token_are_dropped(falcon: Tokenizer) -> None:
    # No unk token and no byte fallback: 28 byte values (e.g. 0x05, 0xF2) have no id, so encode drops them,
    # exactly as the Hugging Face tokenizer does.
    assert falcon.encode("\x05") == []
    assert falcon.decode(falcon.encode("a\x05b")) == "ab"


def test_decode_drops_unknown_ids_and_rejects_negative(falcon: Tokenizer) -> None:
    assert falcon.decode([9856, 70000, 1079]) == "Hello world"
    with pytest.raises(ValueError, match=">= 0"):
        falcon.decode([9856, -1])


def test_builtin_falcon_chat_template(falcon: Tokenizer) -> None:
    assert falcon.chat_template is None
    expected = "System: You are terse.\nUser: Hi!\nFalcon: Hello.\nFalcon:"
    assert falcon.apply_chat_template(CONVERSATION) == expected
    assert falcon.apply_chat_template(CONVERSATION, add_generation_prompt=False) == expected[: -len("Falcon:")]


def test_custom_jinja_template_from_config(falcon_tokenizer_dir: Path, tmp_path: Path) -> None:
    shutil.copyfile(falcon_tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    template = (
        "{{ bos_token }}{% for m in messages %}"
        "<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tok = with_template(tmp_path, template, eos_token="<|endoftext|>", bos_token=">>TITLE<<")
    assert tok.chat_template == template
    assert tok.bos_token_id == 0
    assert tok.apply_chat_template(CONVERSATION[1:]) == (
        ">>TITLE<<<user>Hi!<|endoftext|>\n<assistant>Hello.<|endoftext|>\n<assistant>"
    )
    assert tok.encode(tok.apply_chat_template(CONVERSATION[1:], add_generation_prompt=False))[0] == 0


# ---------------------------------------------------------------------- templates and errors (no shared data)


def test_content_parts_are_joined(tiny_dir: Path) -> None:
    tok = Tokenizer.from_pretrained(tiny_dir)
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    assert tok.apply_chat_template([{"role": "user", "content": parts}]) == "User: one\ntwo\nFalcon:"


def test_tiny_folder_defaults(tiny_dir: Path) -> None:
    tok = Tokenizer.from_pretrained(tiny_dir)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 256
    assert tok.all_special_ids == [256]
    assert tok.decode(tok.encode("héllo 🤗<|endoftext|>")) == "héllo 🤗<|endoftext|>"


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ("hello", "must be a list"),
        (["hello"], r"messages\[0\] must be a dict"),
        ([{"role": "function", "content": "x"}], r"messages\[0\]\.role"),
        ([{"content": "x"}], r"messages\[0\]\.role"),
        ([{"role": "user"}], "no 'content'"),
        ([{"role": "user", "content": 3}], r"content must be a string"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "only parts"),
    ],
)
def test_bad_messages(tiny_dir: Path, messages: object, problem: str) -> None:
    tok = Tokenizer.from_pretrained(tiny_dir)
    with pytest.raises(ValueError, match=problem):
        tok.apply_chat_template(messages)  # type: ignore[arg-type]


def test_template_list_form_takes_default(tiny_dir: Path) -> None:
    templates = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "{{ messages | length }}|{{ messages[0]['content'] | tojson }}"},
    ]
    tok = with_template(tiny_dir, templates)
    assert tok.apply_chat_template([{"role": "user", "content": 'é"x'}]) == '1|"é\\"x"'


def test_template_raise_exception(tiny_dir: Path) -> None:
    tok = with_template(
        tiny_dir, "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    )
    with pytest.raises(ValueError, match="user first"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.append(1) }}",
        "{{ cycler.__init__.__globals__ }}",
    ],
)
def test_template_sandbox(tiny_dir: Path, template: str) -> None:
    tok = with_template(tiny_dir, template)
    with pytest.raises(ValueError, match="SecurityError"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_template_syntax_error(tiny_dir: Path) -> None:
    tok = with_template(tiny_dir, "{% for m in messages %}")
    with pytest.raises(ValueError, match="TemplateSyntaxError"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_unreadable_json(tiny_dir: Path, tmp_path: Path) -> None:
    (tiny_dir / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json"):
        Tokenizer.from_pretrained(tiny_dir)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        Tokenizer.from_pretrained(broken)


def test_bad_chat_template_config(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="default"):
        with_template(tiny_dir, [{"name": "other", "template": "x"}])


def test_chat_template_jinja_file_is_used(tmp_path, falcon_tokenizer_dir):
    (tmp_path / "tokenizer.json").write_bytes((falcon_tokenizer_dir / "tokenizer.json").read_bytes())
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    )
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<user>hi<a>"
