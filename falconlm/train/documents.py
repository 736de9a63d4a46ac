"""Split training text files into documents, streaming line by line.

``eot`` (the default) splits on the literal ``<|endoftext|>`` marker that TinyStories-style files use; a
file without the marker is one document. ``blank`` makes every blank-line-separated block a document;
``none`` keeps each file whole. Documents are stripped of surrounding whitespace and empty ones are dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

END_OF_TEXT = "<|endoftext|>"
DOC_SPLITS = ("eot", "blank", "none")


def iter_documents(path: str | Path, doc_split: str = "eot") -> Iterator[str]:
    """Yield the documents of a UTF-8 text file."""
    if doc_split not in DOC_SPLITS:
        raise ValueError(f"doc_split must be one of {DOC_SPLITS}, got {doc_split!r}")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"data file not found: {file}")
    parts: list[str] = []
    with file.open(encoding="utf-8", errors="replace", newline="") as fh:
        for line in fh:
            if doc_split == "blank" and not line.strip():
                yield from _flush(parts)
                continue
            if doc_split == "eot" and END_OF_TEXT in line:
                pieces = line.split(END_OF_TEXT)
                for piece in pieces[:-1]:
                    parts.append(piece)
                    yield from _flush(parts)
                line = pieces[-1]
            parts.append(line)
    yield from _flush(parts)


def _flush(parts: list[str]) -> Iterator[str]:
    doc = "".join(parts).strip()
    parts.clear()
    if doc:
        yield doc
