"""Private RAG over your own documents, served by falconlm through its OpenAI-compatible API.

``index``: documents -> chunks (:mod:`.chunking`) -> embeddings from ``/v1/embeddings`` (:mod:`.client`) -> a local
index (:mod:`.store`): chunk texts in SQLite, vectors in faiss, and a BM25 index (bm25s).
``ask``: question -> hybrid retrieval, reciprocal rank fusion of the vector and BM25 rankings (:mod:`.retrieve`) ->
numbered passages in a prompt -> a JSON answer with citations through ``response_format`` (:mod:`.answer`).
"""
