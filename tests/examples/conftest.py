"""The examples' own dependencies: the RAG example needs the ``rag`` extra (``pip install -e ".[test,rag]"``)."""

from __future__ import annotations

import importlib.util

import pytest

RAG_DEPENDENCIES = ("openai", "faiss", "bm25s", "jsonschema")
MISSING = [name for name in RAG_DEPENDENCIES if importlib.util.find_spec(name) is None]

needs_rag_extra = pytest.mark.skipif(
    bool(MISSING), reason=f"the RAG example needs the rag extra (pip install -e '.[rag]'); missing: {MISSING}"
)
