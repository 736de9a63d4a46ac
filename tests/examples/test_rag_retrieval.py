"""examples/rag retrieval: reciprocal rank fusion on its own, the faiss + SQLite + BM25 index, hybrid search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from .conftest import needs_rag_extra

pytestmark = needs_rag_extra

from examples.rag.chunking import Chunk  # noqa: E402
from examples.rag.errors import RagError  # noqa: E402
from examples.rag.retrieve import hybrid_search, reciprocal_rank_fusion  # noqa: E402
from examples.rag.store import RagIndex  # noqa: E402


def test_rrf_sums_reciprocal_ranks():
    fused = dict(reciprocal_rank_fusion([[10, 20, 30], [30, 40]], k=60))
    assert fused == pytest.approx({10: 1 / 61, 20: 1 / 62, 30: 1 / 63 + 1 / 61, 40: 1 / 62})


def test_rrf_ranks_agreement_first_and_breaks_ties_by_first_appearance():
    # 30 is in both lists, so it beats every item found by one list only, even the two rank-1 items.
    assert [item for item, _ in reciprocal_rank_fusion([[10, 20, 30], [40, 50, 30]])] == [30, 10, 40, 20, 50]
    assert [item for item, _ in reciprocal_rank_fusion([[40, 50, 30], [10, 20, 30]])] == [30, 40, 10, 50, 20]


def test_rrf_k_controls_how_much_the_top_ranks_weigh():
    rankings = [[1, 5, 2], [3, 6, 2]]
    # k = 0: a first place (1/1) beats two third places (2/3); k = 60: the third places (2/63) beat it (1/61).
    assert [item for item, _ in reciprocal_rank_fusion(rankings, k=0)][:2] == [1, 3]
    assert reciprocal_rank_fusion(rankings, k=60)[0][0] == 2
    assert reciprocal_rank_fusion([], k=60) == [] and reciprocal_rank_fusion([[], [3]]) == [(3, 1 / 61)]


CHUNKS = [
    Chunk("fox.md", 1, "Foxes", "The quick brown fox jumps over the lazy dog."),
    Chunk("cache.md", 1, "PagedAttention", "PagedAttention stores the KV cache in blocks."),
    Chunk("cache.md", 2, "PagedAttention", "Blocks are allocated on demand through a lookup table."),
    Chunk("stream.md", 1, "", "What streams? Tokens stream to the client as server-sent events."),
]


def unit(*values: float) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


VECTORS = np.stack([unit(1, 0, 0), unit(0, 1, 0.2), unit(0, 1, -0.2), unit(0, 0, 1)])


@pytest.fixture
def index(tmp_path: Path) -> RagIndex:
    index = RagIndex.build(tmp_path / "idx", CHUNKS, VECTORS, {"embedding_model": "m", "dimensions": 3})
    yield index
    index.close()


def test_index_round_trips_chunks_and_meta(index: RagIndex, tmp_path: Path):
    reopened = RagIndex.open(tmp_path / "idx")
    assert reopened.num_chunks == 4 and reopened.meta == {"embedding_model": "m", "dimensions": 3}
    assert reopened.chunks([3, 0]) == [CHUNKS[3], CHUNKS[0]]
    reopened.close()


def test_vector_search_is_cosine_nearest_first(index: RagIndex):
    assert index.vector_search(unit(0.3, 1, 0.15), 3) == [1, 2, 0]
    assert index.vector_search(unit(0, 0, 1), 10)[0] == 3  # k past the chunk count is clamped
    with pytest.raises(RagError, match="dimensions"):
        index.vector_search(unit(1, 0, 0, 0), 2)


def test_keyword_search_returns_only_matching_chunks_best_first(index: RagIndex):
    assert index.keyword_search("lookup table", 4) == [2]
    assert index.keyword_search("blocks", 4)[:2] in ([1, 2], [2, 1])
    assert index.keyword_search("pagedattention", 4)[:2] in ([1, 2], [2, 1])  # the section heading counts too
    assert index.keyword_search("What is a zebra?", 4) == []  # question words are stopwords


def test_hybrid_search_fuses_both_retrievers(index: RagIndex):
    # The vector side points at the fox chunk; the words point at the lookup-table chunk.
    passages = hybrid_search(index, "lookup table", unit(1, 0, 0), top_k=2)
    assert [p.chunk_id for p in passages] == [2, 0]  # a tie at 1/61 goes to the keyword match
    assert (passages[0].keyword_rank, passages[0].vector_rank) == (1, 3)
    assert (passages[1].keyword_rank, passages[1].vector_rank) == (None, 1)
    assert passages[0].chunk == CHUNKS[2] and passages[0].score > passages[1].score
    # When both agree, that chunk leads.
    assert hybrid_search(index, "server-sent events", unit(0, 0, 1), top_k=1)[0].chunk_id == 3


def test_rebuilding_replaces_the_index(index: RagIndex, tmp_path: Path):
    RagIndex.build(tmp_path / "idx", CHUNKS[:2], VECTORS[:2], {"embedding_model": "n"}).close()
    reopened = RagIndex.open(tmp_path / "idx")
    assert reopened.num_chunks == 2 and reopened.meta == {"embedding_model": "n"}
    assert reopened.keyword_search("lookup table", 4) == []
    reopened.close()
    assert not (tmp_path / "idx.building").exists()


def test_opening_a_missing_index_says_how_to_build_one(tmp_path: Path):
    with pytest.raises(RagError, match=r"examples\.rag index"):
        RagIndex.open(tmp_path / "none")
