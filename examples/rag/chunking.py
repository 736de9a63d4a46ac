"""Split documents into chunks: by Markdown section, then paragraph, line, sentence and word, packed up to a
character budget, with whole sentences (or lines) of overlap between neighbours.

A character budget, not a token one, keeps the splitter free of any tokenizer; as a rule of thumb English prose is
3 to 4 characters per token, Markdown with tables and links nearer 2. Pick ``max_chars`` so that a chunk fits the
embedding model's context (the server refuses longer input) and a few chunks fit the chat model's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .documents import Document

_HEADING = re.compile(r"^#{1,6}\s+(.*\S)\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
# From coarse to fine, each level with the separator that joins its pieces back together.
_LEVELS = (
    (re.compile(r"\n\s*\n"), "\n\n"),  # paragraphs
    (re.compile(r"\n"), "\n"),  # lines (lists, tables, code)
    (re.compile(r"(?<=[.!?;:])\s+"), " "),  # sentences
    (re.compile(r"\s+"), " "),  # words
)


@dataclass(frozen=True)
class Chunk:
    source: str  # the document's path, as in Document.source
    number: int  # 1, 2, ... within its document
    section: str  # the nearest Markdown heading above the chunk, "" when there is none
    text: str


@dataclass(frozen=True)
class _Piece:
    text: str
    separator: str  # what joins it to the piece before it


def chunk_documents(documents: list[Document], max_chars: int, overlap_chars: int) -> list[Chunk]:
    """All chunks of all ``documents``, each at most ``max_chars`` long, in document order."""
    if max_chars < 50:
        raise ValueError(f"the chunk budget must be at least 50 characters, got {max_chars}")
    if not 0 <= overlap_chars < max_chars:
        raise ValueError(f"the overlap must be in [0, {max_chars}), got {overlap_chars}")
    chunks = []
    for document in documents:
        number = 0
        for section, body in split_sections(document.text):
            for text in pack(split_pieces(body, max_chars), max_chars, overlap_chars):
                number += 1
                chunks.append(Chunk(document.source, number, section, text))
    return chunks


def split_sections(text: str) -> list[tuple[str, str]]:
    """``(heading, body)`` for each Markdown section; the heading line stays at the top of its body.

    Lines inside fenced code blocks are never headings (``# comment`` in a shell snippet).
    """
    sections: list[tuple[str, list[str]]] = [("", [])]
    in_code = False
    for line in text.split("\n"):
        if _FENCE.match(line):
            in_code = not in_code
        heading = None if in_code else _HEADING.match(line)
        if heading:
            sections.append((heading.group(1), []))
        sections[-1][1].append(line)
    bodies = [(heading, "\n".join(lines).strip()) for heading, lines in sections]
    # A heading with nothing under it before the next heading says nothing on its own.
    return [(heading, body) for heading, body in bodies if body and (not heading or "\n" in body)]


def split_pieces(text: str, max_chars: int, level: int = 0, separator: str = "\n\n") -> list[_Piece]:
    """``text`` cut at the coarsest level whose pieces fit in ``max_chars`` (a word longer than that is cut)."""
    if len(text) <= max_chars:
        return [_Piece(text, separator)]
    if level == len(_LEVELS):
        return [_Piece(text[i : i + max_chars], separator if i == 0 else "") for i in range(0, len(text), max_chars)]
    pattern, joiner = _LEVELS[level]
    pieces: list[_Piece] = []
    for part in pattern.split(text):
        if part.strip():
            pieces.extend(split_pieces(part.strip(), max_chars, level + 1, joiner if pieces else separator))
    return pieces


def pack(pieces: list[_Piece], max_chars: int, overlap_chars: int) -> list[str]:
    """Greedily join consecutive pieces into chunks of at most ``max_chars``; each new chunk starts with the last
    whole pieces of the one before that fit in ``overlap_chars``."""
    chunks: list[str] = []
    current: list[_Piece] = []
    for piece in pieces:
        if current and len(_join([*current, piece])) > max_chars:
            chunks.append(_join(current))
            current = _tail(current, overlap_chars)
            while current and len(_join([*current, piece])) > max_chars:
                current.pop(0)
        current.append(piece)
    if current:
        chunks.append(_join(current))
    return chunks


def _tail(pieces: list[_Piece], max_chars: int) -> list[_Piece]:
    """The longest run of trailing pieces whose joined text fits in ``max_chars``."""
    tail: list[_Piece] = []
    for piece in reversed(pieces):
        if len(_join([piece, *tail])) > max_chars:
            break
        tail.insert(0, piece)
    return tail


def _join(pieces: list[_Piece]) -> str:
    return pieces[0].text + "".join(p.separator + p.text for p in pieces[1:])
