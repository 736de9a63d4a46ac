"""Falcon tokenizer: a thin layer over the ``tokenizers`` library plus chat templates.

Reads ``tokenizer.json`` (byte-level BPE, falcon-spec §6), and the optional ``tokenizer_config.json`` /
``special_tokens_map.json`` for the eos/bos tokens and a Jinja ``chat_template``. Chat templates render in
jinja2's immutable sandbox, like Hugging Face ``transformers``; without one, a built-in Falcon
``User:``/``Falcon:`` template is used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import tokenizers

from .template_limits import BoundedSandbox, render_bounded
from .tool_prompt import arguments_as_objects, fold_tools_into_messages, template_reads

# Falcon's end-of-text token, used when no config names an eos token.
_DEFAULT_EOS = "<|endoftext|>"
_ROLES = ("system", "user", "assistant", "tool")
_ROLE_PREFIX = {"system": "System", "user": "User", "assistant": "Falcon", "tool": "Tool"}


class Tokenizer:
    """Encode and decode Falcon text, and render chat prompts."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos_token: str | None = None,
        bos_token: str | None = None,
        chat_template: str | None = None,
        extra_special_tokens: Sequence[str] = (),
    ) -> None:
        self.backend = backend
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.chat_template = chat_template
        self._extra_special_tokens = tuple(extra_special_tokens)
        # get_vocab_size(with_added_tokens=True) takes ~10 ms on Falcon's vocab: count once.
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a tokenizer folder holding ``tokenizer.json`` (and optional config files)."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {folder}")
        tokenizer_file = folder / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"tokenizer.json not found in {folder} (looked for {tokenizer_file})")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust side raises a bare Exception
            raise ValueError(f"cannot read {tokenizer_file}: {exc}") from exc

        config = _read_json_object(folder / "tokenizer_config.json")
        special_map = _read_json_object(folder / "special_tokens_map.json")
        eos = _token_text(config.get("eos_token")) or _token_text(special_map.get("eos_token"))
        if eos is None and backend.token_to_id(_DEFAULT_EOS) is not None:
            eos = _DEFAULT_EOS
        bos = _token_text(config.get("bos_token")) or _token_text(special_map.get("bos_token"))
        extra = [
            text
            for source in (config, special_map)
            for item in source.get("additional_special_tokens") or []
            if (text := _token_text(item)) is not None
        ]
        template = _select_chat_template(config.get("chat_template"), folder / "tokenizer_config.json")
        jinja_file = folder / "chat_template.jinja"  # newer Hugging Face folders keep the template beside
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        return cls(backend, eos_token=eos, bos_token=bos, chat_template=template, extra_special_tokens=extra)

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (counted when the Tokenizer was made)."""
        return self._vocab_size

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def all_special_ids(self) -> list[int]:
        """Sorted ids of every special token (added special tokens, eos, bos, additional specials)."""
        ids = {i for i, tok in self.backend.get_added_tokens_decoder().items() if tok.special}
        for text in (self.eos_token, self.bos_token, *self._extra_special_tokens):
            if text is not None and (i := self.backend.token_to_id(text)) is not None:
                ids.add(i)
        return sorted(ids)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of ``token_id`` (byte-level form), or None when out of range."""
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary string, or None when absent."""
        return self.backend.token_to_id(token)

    # ------------------------------------------------------------------ text <-> ids

    def encode(self, text: str) -> list[int]:
        """Token ids for ``text``; no BOS/EOS is added, special tokens in the text stay whole.

        Like Hugging Face, bytes without a token (Falcon lacks 28, e.g. 0x05) are dropped silently.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text for ``ids``; bytes that do not form valid UTF-8 become U+FFFD.

        Ids at or above ``vocab_size`` are dropped (a padded lm_head can sample them); negative ids raise.
        """
        ids = [int(i) for i in ids]
        if ids and min(ids) < 0:
            raise ValueError(f"token ids must be >= 0, got {min(ids)}")
        known = [i for i in ids if i < self._vocab_size]
        return self.backend.decode(known, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> str:
        """Render a chat as a prompt string, with the folder's template or the built-in Falcon one.

        ``tools`` (OpenAI tool objects) reach a Jinja template as its ``tools`` variable, as in Hugging Face;
        for a template that never reads them (and the built-in one) they, earlier ``tool_calls`` and ``tool``
        messages are written into the messages instead (``falconlm.tool_prompt``)."""
        normalized = _normalize_messages(messages)
        source = self.chat_template
        normalized = fold_tools_into_messages(
            normalized,
            tools,
            inject_tools=not template_reads(source, "tools"),
            fold_tool_calls=not template_reads(source, "tool_calls"),
            fold_tool_role=source is not None and not template_reads(source, "tool"),
        )
        if source is None:
            return _falcon_chat(normalized, add_generation_prompt)
        context: dict[str, Any] = {"tools": tools} if tools else {}
        return _render_jinja(
            source,
            messages=arguments_as_objects(normalized),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **context,
        )

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_token={self.eos_token!r})"


# ---------------------------------------------------------------------- helpers


TOKENIZER_FILE = "tokenizer.json"


class NoTokenizer:
    """Stands in for a :class:`Tokenizer` when a model runs without one (vLLM's ``skip_tokenizer_init``).

    Prompts must then be token ids and outputs come back as ids with empty text: :meth:`decode` gives "" and
    anything that needs text (:meth:`encode`, chat templates) raises a ValueError that says why. The end of a
    sequence is the model config's ``eos_token_id``.
    """

    def __init__(self, eos_token_id: int | None, reason: str) -> None:
        self.eos_token_id = eos_token_id
        self.reason = reason  # why there is no tokenizer, for the error messages

    def encode(self, text: str) -> NoReturn:
        raise ValueError(f"text prompts need a tokenizer, and {self.reason}; give the prompt as token ids")

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return ""

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> NoReturn:
        raise ValueError(f"chat templates need a tokenizer, and {self.reason}")

    def __repr__(self) -> str:
        return f"NoTokenizer(eos_token_id={self.eos_token_id}, {self.reason})"


def load_tokenizer(
    path: str | os.PathLike[str], eos_token_id: int | None, skip_tokenizer_init: bool = False
) -> Tokenizer | NoTokenizer:
    """The tokenizer of a model folder; a :class:`NoTokenizer` (token ids only) when ``skip_tokenizer_init``
    asks for none or the folder has no ``tokenizer.json``."""
    folder = Path(path)
    if skip_tokenizer_init:
        return NoTokenizer(eos_token_id, "the model was loaded with skip_tokenizer_init")
    if folder.is_dir() and not (folder / TOKENIZER_FILE).is_file():
        return NoTokenizer(eos_token_id, f"{folder} has no {TOKENIZER_FILE}")
    return Tokenizer.from_pretrained(folder)


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; {} when the file is absent; ValueError naming the file when unreadable."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"cannot read {path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(item: Any) -> str | None:
    """A special token as a string; configs store either the text or an AddedToken dict with ``content``."""
    if isinstance(item, str):
        return item
    if isinstance(item, Mapping) and isinstance(item.get("content"), str):
        return item["content"]
    return None


def _select_chat_template(value: Any, source: Path) -> str | None:
    """The chat template string: a plain string, or the entry named "default" of a list of named templates."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        for entry in value:
            if isinstance(entry, Mapping) and entry.get("name") == "default":
                template = entry.get("template")
                if isinstance(template, str):
                    return template
        raise ValueError(f"{source}: chat_template list has no entry named 'default' with a string template")
    raise ValueError(f"{source}: chat_template must be a string or a list, got {type(value).__name__}")


def _content_text(content: Any, index: int) -> str:
    """Message content as a string: a string, None, or a list of OpenAI text parts (joined by newlines)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"messages[{index}].content: only parts {{'type': 'text', 'text': str}} are supported")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError(
        f"messages[{index}].content must be a string or a list of text parts, got {type(content).__name__}"
    )


def _normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Validated copies of ``messages`` whose content is a plain string."""
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    normalized = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{index}] must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if role not in _ROLES:
            raise ValueError(f"messages[{index}].role must be one of {', '.join(_ROLES)}; got {role!r}")
        if "content" not in message and not message.get("tool_calls"):
            raise ValueError(f"messages[{index}] has no 'content'")
        normalized.append({**message, "content": _content_text(message.get("content"), index)})
    return normalized


def _falcon_chat(messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    """Built-in template: ``System: ...``, ``User: ...`` / ``Falcon: ...`` (and ``Tool: ...``) lines, then
    ``Falcon:``."""
    lines = [f"{_ROLE_PREFIX[m['role']]}: {m['content']}\n" for m in messages]
    if add_generation_prompt:
        lines.append("Falcon:")
    return "".join(lines)


def _raise_exception(message: str) -> NoReturn:
    """Exposed to templates as ``raise_exception``, like Hugging Face."""
    raise ValueError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    """The ``tojson`` filter as chat templates expect it: no HTML escaping, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


@lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(source)


def _render_jinja(source: str, **context: Any) -> str:
    """Render a chat template in the immutable sandbox, bounded in output length and time (``template_limits``);
    every failure becomes a ValueError."""
    try:
        return render_bounded(_compile_template(source), context)
    except ValueError:
        raise
    except Exception as exc:  # TemplateSyntaxError, UndefinedError, SecurityError, a filter's TypeError
        raise ValueError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
