"""The command line: ``index`` builds the local index from a documents folder, ``ask`` answers a question from it.

Errors a user can fix (a missing folder, a server that is down or refuses a request) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .answer import answer_to_json, ask, fit_passages, format_answer
from .chunking import chunk_documents
from .client import context_length, embed, make_client, served_model
from .documents import load_documents
from .errors import RagError
from .retrieve import hybrid_search
from .store import RagIndex

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
MAX_CHUNK_CHARS = 1000


def default_chunk_chars(context_tokens: int | None) -> int:
    """About a third of the model's context at 2.5 characters per token, at most MAX_CHUNK_CHARS: a chunk always
    fits the embedding model, and a few fit beside the question in the chat model."""
    if context_tokens is None:
        return MAX_CHUNK_CHARS
    return max(100, min(MAX_CHUNK_CHARS, int(context_tokens / 3 * 2.5)))


def default_max_tokens(context_tokens: int | None) -> int:
    """The answer's token budget: a quarter of the context, at most 256."""
    return 256 if context_tokens is None else max(32, min(256, context_tokens // 4))


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run_index(args: argparse.Namespace) -> int:
    documents = load_documents(args.docs)  # before the server, so a wrong path fails at once
    client = make_client(args.embeddings_base_url or args.base_url, args.api_key)
    model = args.embedding_model or served_model(client)
    context = context_length(client, model)
    chunk_chars = args.chunk_chars or default_chunk_chars(context)
    overlap_chars = args.overlap_chars if args.overlap_chars is not None else chunk_chars // 5
    chunks = chunk_documents(documents, chunk_chars, overlap_chars)
    print(
        f"{len(documents)} documents, {len(chunks)} chunks of at most {chunk_chars} characters; "
        f"embedding them with {model!r} ...",
        file=sys.stderr,
    )
    started = time.perf_counter()
    with tqdm(total=len(chunks), unit="chunk", desc="embedding", disable=None) as progress:  # only on a terminal
        texts = [chunk.text for chunk in chunks]
        vectors = embed(client, model, texts, args.batch_size, truncate_to=context, on_batch=progress.update)
    meta = {
        "embedding_model": model,
        "dimensions": int(vectors.shape[1]),
        "chunk_chars": chunk_chars,
        "overlap_chars": overlap_chars,
        "documents": [str(path) for path in args.docs],
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    index = RagIndex.build(args.index, chunks, vectors, meta)
    print(
        f"indexed {index.num_chunks} chunks ({vectors.shape[1]}-dim vectors, BM25) into {args.index} "
        f"in {time.perf_counter() - started:.1f} s"
    )
    index.close()
    return 0


def run_ask(args: argparse.Namespace) -> int:
    index = RagIndex.open(args.index)
    try:
        chat = make_client(args.base_url, args.api_key)
        embedder = make_client(args.embeddings_base_url or args.base_url, args.api_key)
        model = args.model or served_model(chat)
        embedding_model = args.embedding_model or index.meta["embedding_model"]
        truncate_to = context_length(embedder, embedding_model)
        (question_vector,) = embed(embedder, embedding_model, [args.question], truncate_to=truncate_to)
        passages = hybrid_search(index, args.question, question_vector, args.top_k)
    finally:
        index.close()
    max_tokens = args.max_tokens or default_max_tokens(context_length(chat, model))
    passages = fit_passages(chat, model, args.question, passages, max_tokens)
    answer = ask(chat, model, args.question, passages, max_tokens, args.max_answer_chars, args.temperature)
    print(json.dumps(answer_to_json(answer), indent=2) if args.json else format_answer(answer))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m examples.rag", description="Private RAG over your documents with a falconlm server."
    )
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument(
        "--base-url",
        default=os.environ.get("OPENAI_BASE_URL", DEFAULT_BASE_URL),
        help=f"the server's OpenAI API root (default: $OPENAI_BASE_URL or {DEFAULT_BASE_URL})",
    )
    server.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "EMPTY"), help="default: $OPENAI_API_KEY")
    server.add_argument("--embeddings-base-url", help="a separate embeddings server (default: --base-url)")
    server.add_argument("--embedding-model", help="default: the server's model (index), the index's model (ask)")
    server.add_argument("--index", type=Path, default=Path("rag-index"), help="the index folder (default: rag-index)")
    commands = parser.add_subparsers(dest="command", required=True)

    index = commands.add_parser("index", parents=[server], help="chunk, embed and index a documents folder")
    index.add_argument("--docs", type=Path, nargs="+", required=True, help="folders (searched recursively) or files")
    index.add_argument("--chunk-chars", type=positive, help="chunk budget in characters (default: from the context)")
    index.add_argument("--overlap-chars", type=int, help="overlap between chunks (default: a fifth of a chunk)")
    index.add_argument("--batch-size", type=positive, default=32, help="texts per embeddings request (default: 32)")
    index.set_defaults(run=run_index)

    question = commands.add_parser("ask", parents=[server], help="answer a question, citing the passages used")
    question.add_argument("question")
    question.add_argument("--model", help="the chat model (default: the server's model)")
    question.add_argument("--top-k", type=positive, default=4, help="passages to retrieve (default: 4)")
    question.add_argument("--max-tokens", type=positive, help="answer tokens (default: from the context)")
    question.add_argument("--max-answer-chars", type=positive, default=600, help="answer length cap (default: 600)")
    question.add_argument("--temperature", type=float, default=0.0)
    question.add_argument("--json", action="store_true", help="print the answer object and passages as JSON")
    question.set_defaults(run=run_ask)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (RagError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
