"""IncrementalDetokenizer (join invariant, no broken characters, O(1) window) and StopMatcher."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

from falconlm.engine.detokenizer import IncrementalDetokenizer, StopMatcher
from falconlm.tokenizer import Tokenizer

FALCON_VOCAB = 65024
MULTIBYTE = [
    "Führer ½ naïve",
    "🤗🎉 (emoji) 👨‍👩‍👧 family ✅",
    "你好，世界。日本語のテキスト",
    "ស្វាគមន៍ 𝒳𝒴 ∑∫ Привет мир",
    "🚀 (normal) 😶‍🌫️ (multiple emojis concatenated) ✅ (only emoji that has its own token)",
]
# Falcon's vocab has no token for 28 byte values (some C0 controls, and 0xF2, the lead byte of the
# unassigned planes 8-11), so encode drops them; keep below U+80000 so no character loses its lead byte.
VALID_TEXT = st.text(
    st.characters(max_codepoint=0x7FFFF, exclude_categories=("Cs",), exclude_characters="\ufffd"), max_size=40
)


@pytest.fixture(scope="module")
def falcon(falcon_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(falcon_tokenizer_dir)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """One id per byte (no merges) plus ``<|endoftext|>``: no shared data needed."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = BackendTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>"])
    folder = tmp_path_factory.mktemp("tiny")
    backend.save(str(folder / "tokenizer.json"))
    return Tokenizer.from_pretrained(folder)


def byte_char(byte: int) -> str:
    """The character byte-level BPE uses for one raw byte (printable Latin-1 maps to itself)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    if byte in printable:
        return chr(byte)
    return chr(256 + [b for b in range(256) if b not in printable].index(byte))


def byte_ids(tok: Tokenizer, data: bytes) -> list[int]:
    """One token id per byte of ``data``."""
    ids = [tok.token_to_id(byte_char(b)) for b in data]
    assert None not in ids
    return ids  # type: ignore[return-value]


def stream(tok: Tokenizer, chunks: list[list[int]], skip: bool = False) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    pieces = [detok.add(chunk) for chunk in chunks]
    tail = detok.finish()
    assert detok.text == "".join(pieces) + tail
    assert detok.token_ids == [i for chunk in chunks for i in chunk]
    return pieces, tail


def chunked(ids: list[int], sizes: list[int]) -> list[list[int]]:
    chunks, start = [], 0
    for size in sizes:
        chunks.append(ids[start : start + size])
        start += size
    return [*chunks, ids[start:]]


# ---------------------------------------------------------------------- join invariant


ANY_ID = st.one_of(
    st.integers(0, 300),  # specials and single-byte pieces
    st.integers(0, FALCON_VOCAB - 1),
    st.integers(FALCON_VOCAB, FALCON_VOCAB + 10),  # a padded lm_head can emit these; decode drops them
)


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(ANY_ID, max_size=60), sizes=st.lists(st.integers(0, 4), max_size=20), skip=st.booleans())
def test_join_equals_decode_random_ids(falcon: Tokenizer, ids: list[int], sizes: list[int], skip: bool) -> None:
    pieces, tail = stream(falcon, chunked(ids, sizes), skip)
    assert "".join(pieces) + tail == falcon.decode(ids, skip_special_tokens=skip)


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 256), max_size=80), skip=st.booleans())
def test_join_equals_decode_raw_bytes(tiny: Tokenizer, ids: list[int], skip: bool) -> None:
    pieces, tail = stream(tiny, [[i] for i in ids], skip)
    assert "".join(pieces) + tail == tiny.decode(ids, skip_special_tokens=skip)


@settings(max_examples=200, deadline=None)
@given(text=VALID_TEXT)
@example(text="".join(MULTIBYTE))
def test_valid_text_never_emits_replacement(falcon: Tokenizer, text: str) -> None:
    ids = falcon.encode(text)
    pieces, tail = stream(falcon, [[i] for i in ids])
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) + tail == falcon.decode(ids)
    assert tail == ""


@pytest.mark.parametrize("text", MULTIBYTE)
def test_multibyte_text_one_id_at_a_time(falcon: Tokenizer, text: str) -> None:
    ids = falcon.encode(text)
    pieces, tail = stream(falcon, [[i] for i in ids])
    assert "".join(pieces) == text and tail == ""
    # Decoding token by token would break characters: the input really tests holding back.
    assert any("\ufffd" in falcon.decode([i]) for i in ids)
    assert all("\ufffd" not in piece for piece in pieces)


@pytest.mark.parametrize("text", MULTIBYTE)
def test_multibyte_text_byte_by_byte(falcon: Tokenizer, text: str) -> None:
    pieces, tail = stream(falcon, [[i] for i in byte_ids(falcon, text.encode())])
    assert "".join(pieces) == text and tail == ""
    assert all("\ufffd" not in piece for piece in pieces)


def test_character_held_until_complete(falcon: Tokenizer) -> None:
    detok = IncrementalDetokenizer(falcon)
    first, second, third = byte_ids(falcon, "€".encode())
    assert detok.add(falcon.encode("cost: ")) == "cost: "
    assert detok.add(first) == ""
    assert detok.add(second) == ""
    assert detok.add([third, *falcon.encode("5")]) == "€5"
    assert detok.finish() == ""


def test_truncated_character_flushed_by_finish(falcon: Tokenizer) -> None:
    ids = falcon.encode("ok ") + byte_ids(falcon, "€".encode()[:2])
    pieces, tail = stream(falcon, [[i] for i in ids])
    assert "".join(pieces) == "ok "
    assert tail == "\ufffd" == falcon.decode(ids)[-1]


def test_invalid_byte_is_emitted_once_followed(falcon: Tokenizer) -> None:
    detok = IncrementalDetokenizer(falcon)
    assert detok.add(byte_ids(falcon, b"\x80")) == ""  # could be a literal U+FFFD still forming: held
    assert detok.add(falcon.encode("Hi")) == "\ufffdHi"


def test_skip_special_tokens(falcon: Tokenizer) -> None:
    ids = falcon.encode(">>QUESTION<<Hi<|endoftext|>there")
    pieces, tail = stream(falcon, [[i] for i in ids], skip=True)
    assert "".join(pieces) + tail == "Hithere"
    pieces, tail = stream(falcon, [[i] for i in ids], skip=False)
    assert "".join(pieces) + tail == ">>QUESTION<<Hi<|endoftext|>there"


def test_window_stays_small(falcon: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    decode = falcon.decode

    def spy(ids: list[int], skip_special_tokens: bool = False) -> str:
        sizes.append(len(ids))
        return decode(ids, skip_special_tokens)

    monkeypatch.setattr(falcon, "decode", spy)
    text = " ".join(MULTIBYTE) * 20
    broken = byte_ids(falcon, b"\xe2\x82" * 300)  # every step ends in U+FFFD
    for ids in (falcon.encode(text), broken, byte_ids(falcon, text.encode())):
        sizes.clear()
        pieces, tail = stream(falcon, [[i] for i in ids])
        assert "".join(pieces) + tail == decode(ids)
        assert max(sizes) <= 16, max(sizes)


def test_add_accepts_int_and_lists_and_rejects_after_finish(falcon: Tokenizer) -> None:
    detok = IncrementalDetokenizer(falcon)
    assert detok.add(9856) == "Hello"
    assert detok.add([]) == ""
    assert detok.add((1079,)) == " world"
    assert detok.finish() == ""
    assert detok.finish() == ""
    with pytest.raises(RuntimeError):
        detok.add(11)


# ---------------------------------------------------------------------- StopMatcher


def run_stop(stop: list[str], pieces: list[str]) -> tuple[list[tuple[str, bool]], str, bool]:
    matcher = StopMatcher(stop)
    results = [matcher.feed(piece) for piece in pieces]
    return results, matcher.flush(), matcher.stopped


def test_stop_across_pieces() -> None:
    results, rest, stopped = run_stop(["END"], ["hello E", "N", "D world"])
    assert results == [("hello ", False), ("", False), ("", True)]
    assert rest == "" and stopped


def test_stop_at_very_start() -> None:
    assert run_stop(["Hi"], ["Hi there"]) == ([("", True)], "", True)
    assert run_stop(["Hi"], ["H", "i", "x"]) == ([("", False), ("", True), ("", True)], "", True)


def test_overlapping_candidates() -> None:
    assert run_stop(["ab", "bc"], ["a", "bc"]) == ([("", False), ("", True)], "", True)
    assert run_stop(["bc", "ab"], ["xa", "bc"]) == ([("x", False), ("", True)], "", True)


def test_earliest_occurrence_wins() -> None:
    assert run_stop(["world", "lo"], ["hello world"])[0] == [("hel", True)]
    # "b" completes first, but "abc" starts earlier and may still complete: wait for it.
    assert run_stop(["abc", "b"], ["a", "b", "c"])[0] == [("", False), ("", False), ("", True)]
    assert run_stop(["abc", "b"], ["a", "b", "x"])[0] == [("", False), ("", False), ("a", True)]
    assert run_stop(["abc", "b"], ["a", "b"]) == ([("", False), ("", False)], "a", True)


def test_no_stop_flush_returns_everything() -> None:
    results, rest, stopped = run_stop(["xyz"], ["abc x", "y"])
    assert results == [("abc ", False), ("", False)]
    assert rest == "xy" and not stopped


def test_stop_string_never_emitted() -> None:
    results, rest, _ = run_stop(["</s>"], ["a<", "/s", "> b", "more"])
    emitted = "".join(text for text, _ in results) + rest
    assert emitted == "a"
    assert results[-1] == ("", True)


def test_without_stop_strings_text_passes_through() -> None:
    for stop in ([], [""]):
        assert run_stop(stop, ["a", "b"]) == ([("a", False), ("b", False)], "", False)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text("abc", max_size=20),
    stop=st.lists(st.text("abc", min_size=1, max_size=3), max_size=3),
    cuts=st.lists(st.integers(0, 20), max_size=6),
)
def test_stop_does_not_depend_on_chunking(text: str, stop: list[str], cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(text)]
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds) if a <= b]
    results, rest, stopped = run_stop(stop, pieces)
    found = [i for s in stop if (i := text.find(s)) >= 0]
    expected = text[: min(found)] if found else text
    assert "".join(out for out, _ in results) + rest == expected
    assert stopped == bool(found)
