"""Load the documents to index: Markdown and plain-text files under the given folders, lightly cleaned."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import RagError

DOCUMENT_SUFFIXES = (".md", ".markdown", ".mdx", ".rst", ".txt")

_IMAGE = re.compile(r"!\[[^\]]*\]\([^)]*\)")  # ![alt](url): nothing to read
_TAG = re.compile(r"</?[A-Za-z][^<>]*>")  # HTML / MDX tags such as <div align="center"> or <Tip>
_BLANK_RUN = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class Document:
    source: str  # the path shown in citations, relative to the folder it was found in
    text: str


def clean_text(text: str) -> str:
    """Drop images and HTML/MDX tags (keeping the text between tags) and squeeze runs of blank lines."""
    text = text.replace("\r\n", "\n")
    text = _TAG.sub("", _IMAGE.sub("", text))
    return _BLANK_RUN.sub("\n\n", text).strip()


def load_documents(paths: list[Path]) -> list[Document]:
    """Every document file under ``paths`` (folders are searched recursively; files are taken as given).

    A source is named relative to the folder it was found in, so ``--docs rag-docs`` gives ``tgi-docs/quicktour.md``.
    """
    documents = []
    for root in paths:
        if not root.exists():
            raise RagError(f"no such documents folder or file: {root}")
        if root.is_file():
            files, base = [root], root.parent
        else:
            files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in DOCUMENT_SUFFIXES)
            base = root
        for path in files:
            text = clean_text(path.read_text(encoding="utf-8", errors="replace"))
            if text:
                documents.append(Document(source=path.relative_to(base).as_posix(), text=text))
    if not documents:
        raise RagError(f"no documents ({', '.join(DOCUMENT_SUFFIXES)}) found under {', '.join(map(str, paths))}")
    return documents
