"""Hybrid retrieval: a vector ranking and a BM25 ranking, merged by reciprocal rank fusion.

Reciprocal rank fusion (Cormack, Clarke and Buettcher, SIGIR 2009) scores each item by ``sum(1 / (k + rank))`` over
the rankings it appears in (ranks from 1). It needs no score calibration between the two retrievers, which is
the point: cosine similarities and BM25 scores live on unrelated scales. ``k = 60`` is the paper's constant.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .chunking import Chunk
from .store import RagIndex

RRF_K = 60


@dataclass(frozen=True)
class Passage:
    chunk_id: int
    chunk: Chunk
    score: float  # the fused score
    vector_rank: int | None  # 1-based rank in each retriever's list, None when it did not find the chunk
    keyword_rank: int | None


def reciprocal_rank_fusion(rankings: list[list[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """``(id, fused score)`` for every id in ``rankings``, best first; ties keep the order of first appearance."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    order = {item: i for i, item in enumerate(dict.fromkeys(item for ranking in rankings for item in ranking))}
    return sorted(scores.items(), key=lambda pair: (-pair[1], order[pair[0]]))


def hybrid_search(
    index: RagIndex, question: str, question_vector: np.ndarray, top_k: int, candidates: int | None = None
) -> list[Passage]:
    """The ``top_k`` chunks for ``question`` by fused rank over the ``candidates`` best of each retriever."""
    candidates = candidates or max(4 * top_k, 20)
    by_vector = index.vector_search(question_vector, candidates)
    by_keyword = index.keyword_search(question, candidates)
    # Keyword first, so a tie goes to the exact match: names, codes and rare terms are where embeddings are weakest.
    fused = reciprocal_rank_fusion([by_keyword, by_vector])[:top_k]
    ids = [chunk_id for chunk_id, _ in fused]
    vector_rank = {chunk_id: rank for rank, chunk_id in enumerate(by_vector, start=1)}
    keyword_rank = {chunk_id: rank for rank, chunk_id in enumerate(by_keyword, start=1)}
    return [
        Passage(chunk_id, chunk, score, vector_rank.get(chunk_id), keyword_rank.get(chunk_id))
        for (chunk_id, score), chunk in zip(fused, index.chunks(ids), strict=True)
    ]
