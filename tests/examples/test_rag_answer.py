"""examples/rag answers: the answer schema, validating a reply, the prompt's numbered passages, the printout."""

from __future__ import annotations

import json

import pytest

from .conftest import needs_rag_extra

pytestmark = needs_rag_extra

from examples.rag.answer import (  # noqa: E402
    Answer,
    answer_schema,
    answer_to_json,
    ask,
    build_messages,
    format_answer,
    parse_answer,
)
from examples.rag.chunking import Chunk  # noqa: E402
from examples.rag.errors import RagError  # noqa: E402
from examples.rag.retrieve import Passage  # noqa: E402

PASSAGES = [
    Passage(7, Chunk("tgi-docs/quicktour.md", 3, "Quick Tour", "Run the container with docker."), 0.03, 1, 2),
    Passage(2, Chunk("falcon-7b-README.md", 1, "", "Falcon-7B was trained on 1,500B tokens."), 0.02, None, 1),
]


def test_schema_accepts_an_answer_citing_shown_passages_only():
    schema = answer_schema(num_passages=2, max_answer_chars=40)
    assert parse_answer('{"answer": " It used 1,500B tokens. ", "citations": [2, 1]}', schema) == (
        "It used 1,500B tokens.",
        [2, 1],
    )
    assert parse_answer('{"answer": "x", "citations": [2, 2]}', schema) == ("x", [2])  # each cited once
    assert parse_answer('{"answer": "", "citations": []}', schema) == ("", [])
    for bad, why in [
        ('{"answer": "x", "citations": [3]}', "is not one of"),
        ('{"answer": "x", "citations": [0]}', "is not one of"),
        ('{"answer": "x"}', "'citations' is a required property"),
        ('{"answer": "x", "citations": [], "extra": 1}', "Additional properties"),
        ('{"answer": "' + "x" * 41 + '", "citations": []}', "is too long"),
        ('{"answer": "x", "citations": [1, 2, 1]}', "is too long"),
    ]:
        with pytest.raises(RagError, match=why):
            parse_answer(bad, schema)
    with pytest.raises(RagError, match="not JSON"):
        parse_answer('{"answer": "x", "citat', schema)


def test_prompt_numbers_passages_from_one_with_their_source():
    system, user = build_messages("How many tokens?", PASSAGES)
    assert system["role"] == "system" and "cite" in system["content"]
    assert user["role"] == "user" and user["content"].endswith("Question: How many tokens?")
    assert "[1] tgi-docs/quicktour.md, chunk 3\nRun the container" in user["content"]
    assert "[2] falcon-7b-README.md, chunk 1\nFalcon-7B was trained" in user["content"]


def test_printout_lists_the_cited_passages_only():
    answer = Answer("Falcon-7B saw 1,500B tokens.", [2], PASSAGES)
    text = format_answer(answer)
    assert text.startswith("Falcon-7B saw 1,500B tokens.")
    assert "[2] falcon-7b-README.md, chunk 1" in text and "1,500B tokens." in text.split("[2]")[1]
    assert "quicktour" not in text
    assert "No passage cited." in format_answer(Answer("Not in the passages.", [], PASSAGES))
    as_json = json.loads(json.dumps(answer_to_json(answer)))
    assert as_json["citations"] == [2]
    assert [(p["number"], p["source"], p["chunk"], p["cited"]) for p in as_json["passages"]] == [
        (1, "tgi-docs/quicktour.md", 3, False),
        (2, "falcon-7b-README.md", 1, True),
    ]


def test_a_token_budget_too_small_for_any_answer_is_refused_before_asking():
    with pytest.raises(RagError, match="leaves no room for an answer"):
        ask(None, "m", "Why?", PASSAGES, max_tokens=20)  # no client needed: it never gets that far
