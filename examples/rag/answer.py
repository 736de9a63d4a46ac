"""Answer a question from retrieved passages: numbered passages in the prompt, a JSON answer object through
``response_format`` (a JSON schema the server enforces while it samples), validated again here."""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass

import jsonschema
import openai

from .client import context_length, count_chat_tokens, server_errors
from .errors import RagError
from .retrieve import Passage

# Short, because small models have small contexts; the JSON shape itself is enforced by the schema.
SYSTEM_PROMPT = (
    "Answer the question from the numbered passages only, and cite the numbers of the passages you used. "
    "If they do not hold the answer, say so."
)
# Tokens an answer object takes besides the answer's characters and its citations (2 tokens each): braces, keys and
# quotes. A token holds at least one character, so an answer capped at what is left always closes within max_tokens.
JSON_OVERHEAD_TOKENS = 24


@dataclass(frozen=True)
class Answer:
    text: str
    citations: list[int]  # passage numbers, 1-based, each once
    passages: list[Passage]  # the passages the model was shown, numbered from 1

    @property
    def cited(self) -> list[tuple[int, Passage]]:
        return [(number, self.passages[number - 1]) for number in self.citations]


def answer_schema(num_passages: int, max_answer_chars: int) -> dict:
    """The answer object's JSON schema; a citation can only name a passage that was shown, each at most once."""
    numbers = list(range(1, num_passages + 1))
    return {
        "type": "object",
        "properties": {
            "answer": {"type": "string", "maxLength": max_answer_chars},
            "citations": {"type": "array", "items": {"type": "integer", "enum": numbers}, "maxItems": num_passages},
        },
        "required": ["answer", "citations"],
        "additionalProperties": False,
    }


def build_messages(question: str, passages: list[Passage]) -> list[dict]:
    blocks = [
        f"[{number}] {p.chunk.source}, chunk {p.chunk.number}\n{p.chunk.text}"
        for number, p in enumerate(passages, start=1)
    ]
    user = "Passages:\n\n" + "\n\n".join(blocks) + f"\n\nQuestion: {question}"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def fit_passages(
    client: openai.OpenAI, model: str, question: str, passages: list[Passage], max_tokens: int
) -> list[Passage]:
    """The best-ranked passages whose prompt leaves ``max_tokens`` for the answer in the model's context.

    Returns all of them when the server does not say its context length or cannot count tokens.
    """
    limit = context_length(client, model)
    if limit is None:
        return passages
    for n in range(len(passages), 0, -1):
        count = count_chat_tokens(client, model, build_messages(question, passages[:n]))
        if count is None:
            return passages
        if count + max_tokens <= limit:
            return passages[:n]
    raise RagError(
        f"the question and its best passage do not fit in the model's {limit}-token context with {max_tokens} "
        "tokens left for the answer: lower --max-tokens, or index with a smaller --chunk-chars"
    )


def ask(
    client: openai.OpenAI,
    model: str,
    question: str,
    passages: list[Passage],
    max_tokens: int,
    max_answer_chars: int = 600,
    temperature: float = 0.0,
) -> Answer:
    """Ask ``model`` to answer ``question`` from ``passages`` and return the validated answer object.

    The answer's length is capped so that the JSON object closes within ``max_tokens`` (see JSON_OVERHEAD_TOKENS).
    """
    budget = max_tokens - JSON_OVERHEAD_TOKENS - 2 * len(passages)
    if budget < 1:
        needed = max_tokens - budget + 16
        raise RagError(f"--max-tokens {max_tokens} leaves no room for an answer: give it at least {needed}")
    schema = answer_schema(len(passages), min(max_answer_chars, budget))
    response_format = {"type": "json_schema", "json_schema": {"name": "rag_answer", "schema": schema, "strict": True}}
    with server_errors(client, "asking the model"):
        reply = client.chat.completions.create(
            model=model,
            messages=build_messages(question, passages),
            max_tokens=max_tokens,
            temperature=temperature,
            response_format=response_format,
        )
    choice = reply.choices[0]
    if choice.finish_reason == "length":
        raise RagError(
            f"the answer was cut off at {max_tokens} tokens before its JSON object closed: raise --max-tokens "
            f"(or lower --max-answer-chars); the reply so far: {choice.message.content!r}"
        )
    answer, citations = parse_answer(choice.message.content or "", schema)
    return Answer(answer, citations, passages)


def parse_answer(content: str, schema: dict) -> tuple[str, list[int]]:
    """``(answer, citations)`` from the model's reply; a RagError names what is wrong with a bad one."""
    try:
        obj = json.loads(content)
        jsonschema.validate(obj, schema)
    except json.JSONDecodeError as exc:
        raise RagError(f"the model's reply is not JSON ({exc}): {content!r}") from exc
    except jsonschema.ValidationError as exc:
        raise RagError(f"the model's reply does not fit the answer schema ({exc.message}): {content!r}") from exc
    return obj["answer"].strip(), list(dict.fromkeys(obj["citations"]))


def format_answer(answer: Answer, width: int = 100) -> str:
    """The answer, then each cited passage: its number, source file, chunk and the start of its text."""
    lines = [textwrap.fill(answer.text, width) or "(empty answer)", ""]
    if not answer.citations:
        lines.append("No passage cited.")
    for number, passage in answer.cited:
        chunk = passage.chunk
        section = f", section {chunk.section!r}" if chunk.section else ""
        lines.append(f"[{number}] {chunk.source}, chunk {chunk.number}{section}")
        excerpt = textwrap.shorten(chunk.text, width=3 * width, placeholder=" ...")
        lines.append(textwrap.indent(textwrap.fill(excerpt, width - 4), "    "))
    return "\n".join(lines)


def answer_to_json(answer: Answer) -> dict:
    """The answer object, with every passage shown to the model (and whether it was cited)."""
    return {
        "answer": answer.text,
        "citations": answer.citations,
        "passages": [
            {
                "number": number,
                "source": p.chunk.source,
                "chunk": p.chunk.number,
                "section": p.chunk.section,
                "text": p.chunk.text,
                "cited": number in answer.citations,
                "score": p.score,
            }
            for number, p in enumerate(answer.passages, start=1)
        ],
    }
