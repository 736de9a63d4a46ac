"""Engine logprobs (``TokenLogprobs``) in OpenAI's two shapes: completions' parallel lists, chat's token objects."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from ..engine.sampler import TokenLogprobs
from ..tokenizer import Tokenizer
from .protocol import ChatCompletionLogprobs, ChatCompletionTokenLogprob, ChatCompletionTopLogprob, CompletionLogprobs


@lru_cache(maxsize=1)
def _byte_level_to_byte() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table), reversed: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_FLOOR = -9999.0  # JSON has no -inf: a token the model rules out reports this instead


def _finite(logprob: float) -> float:
    return logprob if logprob > _FLOOR else _FLOOR


class TokenTexts:
    """Token id -> the text OpenAI shows for it and its raw bytes (cached; one per tokenizer)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def _entry(self, token_id: int) -> tuple[str, list[int]]:
        entry = self._cache.get(token_id)
        if entry is None:
            text = self.tokenizer.decode([token_id])
            piece = self.tokenizer.id_to_token(token_id)
            table = _byte_level_to_byte()
            if piece is not None and all(ch in table for ch in piece):
                raw = [table[ch] for ch in piece]
            else:
                raw = list(text.encode("utf-8"))
            entry = self._cache[token_id] = (text, raw)
        return entry

    def text(self, token_id: int) -> str:
        return self._entry(token_id)[0]

    def bytes(self, token_id: int) -> list[int]:
        return self._entry(token_id)[1]


def completion_logprobs(
    token_ids: Sequence[int], entries: Sequence[TokenLogprobs | None], texts: TokenTexts, text_offset: int = 0
) -> CompletionLogprobs:
    """Completions' shape for ``token_ids``; an entry of None (a prompt's first token) gives null logprobs.

    ``top_logprobs`` dicts hold the top N plus the chosen token, as OpenAI's legacy API does.
    """
    out = CompletionLogprobs()
    offset = text_offset
    for token_id, entry in zip(token_ids, entries, strict=True):
        token = texts.text(token_id)
        out.tokens.append(token)
        out.text_offset.append(offset)
        offset += len(token)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_finite(entry.logprob))
        top = {texts.text(i): _finite(lp) for i, lp in entry.top}
        top.setdefault(token, _finite(entry.logprob))
        out.top_logprobs.append(top)
    return out


def next_text_offset(logprobs: CompletionLogprobs, start: int) -> int:
    """The text offset after the tokens of ``logprobs`` (to continue a stream's offsets)."""
    if not logprobs.tokens:
        return start
    return logprobs.text_offset[-1] + len(logprobs.tokens[-1])


def chat_logprobs(entries: Sequence[TokenLogprobs], texts: TokenTexts, num_top: int) -> ChatCompletionLogprobs:
    """Chat's shape: one object per generated token with its ``num_top`` best alternatives."""
    content = []
    for entry in entries:
        top = [
            ChatCompletionTopLogprob(token=texts.text(i), logprob=_finite(lp), bytes=texts.bytes(i))
            for i, lp in entry.top[:num_top]
        ]
        content.append(
            ChatCompletionTokenLogprob(
                token=texts.text(entry.token_id),
                logprob=_finite(entry.logprob),
                bytes=texts.bytes(entry.token_id),
                top_logprobs=top,
            )
        )
    return ChatCompletionLogprobs(content=content)
