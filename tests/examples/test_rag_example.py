"""The RAG example end to end, against a live falconlm server on the embedded default model: index part of
../shared/data/rag-docs through /v1/embeddings, then ask through /v1/chat/completions with a JSON-schema
``response_format``. The model is tiny, so the test checks the machinery (a valid answer object whose citations
name the passages it was shown, retrieval that finds the one document holding a rare word), not the answer's sense.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ..conftest import REPO_ROOT
from ..server.conftest import LiveServer, free_port
from .conftest import needs_rag_extra

pytestmark = needs_rag_extra

MODEL = "falcon-tiny"
# A subset of the documents, to keep the test short: the TGI docs and the Falcon model card (about 80 KB).
SUBSET = ("tgi-docs", "falcon-model-card")
# "Medusa" appears in one document of the subset only: BM25 must find it whatever the tiny model's embeddings say.
RARE_QUESTION, RARE_SOURCE = "What is Medusa?", "conceptual_speculation.md"


@pytest.fixture(scope="module")
def rag_docs(shared_data: Path) -> list[Path]:
    folders = [shared_data / "rag-docs" / name for name in SUBSET]
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        pytest.skip(f"needs the RAG documents in ../shared/data/rag-docs; missing: {missing}")
    return folders


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    """``falconlm serve`` on the embedded default model (in this process, on a free port)."""
    from falconlm.default_model import default_model_path
    from falconlm.engine.async_engine import AsyncEngine
    from falconlm.engine.factory import EngineArgs, build_engine
    from falconlm.server import ServerSettings

    engine = AsyncEngine(build_engine(EngineArgs(dtype="float32", max_num_seqs=8)))
    settings = ServerSettings(served_model_names=(MODEL,), model_path=str(default_model_path()))
    live = LiveServer(engine, settings).start()
    yield live
    live.stop()


def require(server: LiveServer, path: str, body: dict, feature: str) -> None:
    """Skip, naming the missing server feature, when ``server`` does not serve it yet."""
    reply = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    if reply.status_code != 200:
        pytest.skip(f"the server does not serve {feature} yet ({reply.status_code}: {reply.text[:200]})")


@pytest.fixture(scope="module")
def embed_server(server: LiveServer) -> LiveServer:
    """The server, once it is known to serve embeddings (indexing needs nothing else)."""
    require(server, "/v1/embeddings", {"model": MODEL, "input": ["a test"]}, "POST /v1/embeddings")
    return server


@pytest.fixture(scope="module")
def rag_server(embed_server: LiveServer) -> LiveServer:
    """The server, once it is known to serve embeddings and JSON-schema structured output too."""
    server = embed_server
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    require(
        server,
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Give a."}],
            "max_tokens": 8,
            "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}},
        },
        "response_format json_schema in /v1/chat/completions",
    )
    return server


@pytest.fixture(scope="module")
def index_folder(embed_server: LiveServer, rag_docs: list[Path], tmp_path_factory) -> Path:
    from examples.rag.cli import main

    folder = tmp_path_factory.mktemp("rag") / "index"
    docs = [str(f) for f in rag_docs]
    assert main(["index", "--docs", *docs, "--index", str(folder), "--base-url", f"{embed_server.url}/v1"]) == 0
    return folder


def test_index_holds_every_document_of_the_subset(index_folder: Path, rag_docs: list[Path]):
    from examples.rag.store import RagIndex

    index = RagIndex.open(index_folder)
    try:
        sources = {row[0] for row in index.db.execute("SELECT DISTINCT source FROM chunks")}
        expected = {p.name for folder in rag_docs for p in folder.iterdir() if p.suffix in (".md", ".txt")}
        assert sources == expected
        assert index.meta["embedding_model"] == MODEL and index.meta["dimensions"] == index.vectors.d > 0
        # The default budget follows the model's 256-token context, so every chunk fits /v1/embeddings.
        assert index.meta["chunk_chars"] < 256 * 3
        assert index.num_chunks == index.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0] > 100
    finally:
        index.close()


def test_embed_batches_keep_order_and_return_unit_vectors(embed_server: LiveServer):
    import numpy as np

    from examples.rag.client import embed, make_client

    client = make_client(f"{embed_server.url}/v1", "EMPTY")
    texts = ["PagedAttention", "the quick brown fox", "Medusa heads", "streaming tokens", "a bear"]
    batches: list[int] = []
    vectors = embed(client, MODEL, texts, batch_size=2, on_batch=batches.append)
    assert batches == [2, 2, 1] and vectors.shape[0] == 5 and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    alone = np.stack([embed(client, MODEL, [text])[0] for text in texts])
    np.testing.assert_allclose(vectors, alone, atol=1e-4)  # row i is text i's vector, whatever the batch
    assert np.abs(vectors[0] - vectors[2]).max() > 1e-3


def test_hybrid_retrieval_finds_the_one_document_with_a_rare_word(embed_server: LiveServer, index_folder: Path):
    from examples.rag.client import embed, make_client
    from examples.rag.retrieve import hybrid_search
    from examples.rag.store import RagIndex

    index = RagIndex.open(index_folder)
    try:
        (vector,) = embed(make_client(f"{embed_server.url}/v1", "EMPTY"), MODEL, [RARE_QUESTION])
        passages = hybrid_search(index, RARE_QUESTION, vector, top_k=4)
        keyword_hits = index.chunks(index.keyword_search(RARE_QUESTION, index.num_chunks))
    finally:
        index.close()
    # Only the one document says "Medusa", so every keyword hit is in it, whatever the embeddings say ...
    assert keyword_hits and {c.source for c in keyword_hits} == {RARE_SOURCE}
    assert all("medusa" in c.text.lower() or c.section == "Medusa" for c in keyword_hits)
    # ... and fusion puts one of its chunks first (a keyword first place is worth at least any vector-only one).
    assert len(passages) == 4 and passages[0].chunk.source == RARE_SOURCE
    assert any(p.keyword_rank == 1 for p in passages)


def test_ask_returns_a_valid_answer_citing_retrieved_passages(rag_server: LiveServer, index_folder: Path, capsys):
    from examples.rag.cli import main

    capsys.readouterr()
    code = main(["ask", RARE_QUESTION, "--json", "--index", str(index_folder), "--base-url", f"{rag_server.url}/v1"])
    out = capsys.readouterr()
    assert code == 0, out.err
    answer = json.loads(out.out)
    assert isinstance(answer["answer"], str)
    numbers = [p["number"] for p in answer["passages"]]
    assert numbers == list(range(1, len(numbers) + 1)) and numbers  # at least the best passage fits
    assert set(answer["citations"]) <= set(numbers)
    assert [p["number"] for p in answer["passages"] if p["cited"]] == sorted(answer["citations"])
    assert answer["passages"][0]["source"] == RARE_SOURCE


def test_printed_answer_names_the_cited_sources(rag_server: LiveServer, index_folder: Path, capsys):
    """The plain printout is the --json answer (greedy, so the same), with a file-and-chunk line per citation."""
    from examples.rag.cli import main

    question = [
        "ask",
        "How does TGI stream tokens?",
        "--index",
        str(index_folder),
        "--base-url",
        f"{rag_server.url}/v1",
    ]
    capsys.readouterr()
    assert main([*question, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert main(question) == 0
    printed = capsys.readouterr().out
    assert printed.split()[: len(answer["answer"].split())] == answer["answer"].split()
    for passage in answer["passages"]:
        line = f"[{passage['number']}] {passage['source']}, chunk {passage['chunk']}"
        assert (line in printed) == passage["cited"]
    assert ("No passage cited." in printed) == (not answer["citations"])


def test_prompt_is_fitted_to_the_context(server: LiveServer, tmp_path: Path):
    """Passages that would overflow the 256-token context are dropped from the end (no embeddings needed)."""
    from examples.rag.answer import build_messages, fit_passages
    from examples.rag.chunking import Chunk
    from examples.rag.client import context_length, count_chat_tokens, make_client
    from examples.rag.retrieve import Passage

    client = make_client(f"{server.url}/v1", "EMPTY")
    assert context_length(client, MODEL) == 256
    text = "The quick brown fox jumps over the lazy dog. " * 3
    passages = [Passage(i, Chunk("a.txt", i, "", text), 0.0, i, None) for i in range(1, 6)]
    fitted = fit_passages(client, MODEL, "Who jumps?", passages, max_tokens=64)
    assert 1 <= len(fitted) < len(passages) and fitted == passages[: len(fitted)]
    count = count_chat_tokens(client, MODEL, build_messages("Who jumps?", fitted))
    longer = count_chat_tokens(client, MODEL, build_messages("Who jumps?", passages[: len(fitted) + 1]))
    assert count + 64 <= 256 < longer + 64


def test_cli_says_when_the_server_is_down(tmp_path: Path):
    """Through the real entry point: one line on stderr, exit status 2, no traceback."""
    (tmp_path / "a.md").write_text("# A\n\nSome text.")
    url = f"http://127.0.0.1:{free_port()}/v1"
    down = subprocess.run(
        [sys.executable, "-m", "examples.rag", "index", "--docs", str(tmp_path), "--base-url", url],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert down.returncode == 2, down.stderr
    assert down.stderr.startswith("error: listing the server's models: cannot reach a server at http://127.0.0.1:")
    assert "falconlm serve" in down.stderr and "Traceback" not in down.stderr


def test_cli_says_when_the_docs_or_the_index_are_missing(tmp_path: Path, capsys):
    from examples.rag.cli import main

    assert main(["index", "--docs", str(tmp_path / "nope"), "--base-url", "http://127.0.0.1:9/v1"]) == 2
    assert capsys.readouterr().err == f"error: no such documents folder or file: {tmp_path / 'nope'}\n"
    assert main(["ask", "Why?", "--index", str(tmp_path / "none")]) == 2
    assert "build one first with `python -m examples.rag index`" in capsys.readouterr().err
