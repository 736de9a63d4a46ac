"""The local index, one folder: chunk texts in SQLite, their vectors in faiss, and a BM25 index from bm25s.

Why faiss and not sqlite-vec: sqlite-vec is a SQLite extension, and Python's ``sqlite3`` can load extensions only
when CPython was built with ``--enable-loadable-sqlite-extensions``, which many builds are not (pyenv's default and
macOS's system Python among them). faiss-cpu installs from a wheel everywhere and scales from the exact search used
here (``IndexFlatIP``: cosine similarity on unit vectors) to approximate indexes for millions of chunks.

Layout: ``chunks.sqlite`` (table ``chunks``: id, source, number, section, text; table ``meta``: how the index was
built), ``vectors.faiss`` (row ``i`` is the vector of chunk id ``i``), ``bm25/`` (the bm25s index over the same ids).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import bm25s
import faiss
import numpy as np

from .chunking import Chunk
from .errors import RagError

CHUNKS_FILE = "chunks.sqlite"
VECTORS_FILE = "vectors.faiss"
BM25_FOLDER = "bm25"
# NLTK's English stopwords, which (unlike bm25s's short "en" list) hold the question words: in "What is Medusa?"
# only "medusa" should count. The same tokenization serves the chunks and the questions.
STOPWORDS = "en_plus"

_SCHEMA = """
CREATE TABLE chunks (id INTEGER PRIMARY KEY, source TEXT NOT NULL, number INTEGER NOT NULL,
                     section TEXT NOT NULL, text TEXT NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class RagIndex:
    """Chunks with two ways to find them: nearest vectors and BM25 keyword scores. Chunk ids are 0, 1, 2, ..."""

    def __init__(self, folder: Path, db: sqlite3.Connection, vectors: faiss.Index, bm25: bm25s.BM25) -> None:
        self.folder = folder
        self.db = db
        self.vectors = vectors
        self.bm25 = bm25
        self.meta: dict = {key: json.loads(value) for key, value in db.execute("SELECT key, value FROM meta")}

    @property
    def num_chunks(self) -> int:
        return self.vectors.ntotal

    @classmethod
    def build(cls, folder: Path, chunks: list[Chunk], vectors: np.ndarray, meta: dict) -> RagIndex:
        """Write a new index into ``folder``, replacing any index there only once the new one is complete."""
        if len(chunks) != len(vectors) or not chunks:
            raise ValueError(f"need one vector per chunk, got {len(vectors)} vectors for {len(chunks)} chunks")
        staging = folder.with_name(folder.name + ".building")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)

        with sqlite3.connect(staging / CHUNKS_FILE) as db:
            db.executescript(_SCHEMA)
            db.executemany(
                "INSERT INTO chunks VALUES (?, ?, ?, ?, ?)",
                [(i, c.source, c.number, c.section, c.text) for i, c in enumerate(chunks)],
            )
            db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
        db.close()

        flat = faiss.IndexFlatIP(vectors.shape[1])  # inner product of unit vectors = cosine similarity
        flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
        faiss.write_index(flat, str(staging / VECTORS_FILE))

        bm25 = bm25s.BM25()
        tokens = bm25s.tokenize([_keyword_text(c) for c in chunks], stopwords=STOPWORDS, show_progress=False)
        bm25.index(tokens, show_progress=False)
        bm25.save(str(staging / BM25_FOLDER))

        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
        return cls.open(folder)

    @classmethod
    def open(cls, folder: Path) -> RagIndex:
        if not (folder / CHUNKS_FILE).is_file():
            raise RagError(f"no index in {folder}: build one first with `python -m examples.rag index`")
        db = sqlite3.connect(folder / CHUNKS_FILE)
        vectors = faiss.read_index(str(folder / VECTORS_FILE))
        bm25 = bm25s.BM25.load(str(folder / BM25_FOLDER))
        return cls(folder, db, vectors, bm25)

    def close(self) -> None:
        self.db.close()

    def chunks(self, ids: list[int]) -> list[Chunk]:
        """The chunks with these ids, in the same order."""
        rows = {
            row[0]: Chunk(*row[1:])
            for row in self.db.execute(
                f"SELECT id, source, number, section, text FROM chunks WHERE id IN ({','.join('?' * len(ids))})",
                ids,
            )
        }
        return [rows[i] for i in ids]

    def vector_search(self, query_vector: np.ndarray, k: int) -> list[int]:
        """Ids of the ``k`` chunks nearest to the (unit) ``query_vector``, nearest first."""
        if query_vector.shape[-1] != self.vectors.d:
            raise RagError(
                f"the question's embedding has {query_vector.shape[-1]} dimensions but the index holds "
                f"{self.vectors.d}: ask with the embedding model the index was built with "
                f"({self.meta.get('embedding_model')!r})"
            )
        _, ids = self.vectors.search(query_vector.reshape(1, -1).astype(np.float32), min(k, self.num_chunks))
        return [int(i) for i in ids[0] if i >= 0]

    def keyword_search(self, query: str, k: int) -> list[int]:
        """Ids of up to ``k`` chunks that share a keyword with ``query``, best BM25 score first."""
        tokens = bm25s.tokenize([query], stopwords=STOPWORDS, show_progress=False)
        ids, scores = self.bm25.retrieve(tokens, k=min(k, self.num_chunks), show_progress=False)
        return [int(i) for i, score in zip(ids[0], scores[0], strict=True) if score > 0]


def _keyword_text(chunk: Chunk) -> str:
    """What BM25 sees: the chunk and its section heading (a heading's words often name the topic)."""
    return f"{chunk.section}\n{chunk.text}" if chunk.section and chunk.section not in chunk.text else chunk.text
