"""examples/rag chunking and document loading: budgets hold, nothing is lost, sections and overlap are kept."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .conftest import needs_rag_extra

pytestmark = needs_rag_extra

from examples.rag.chunking import chunk_documents, split_sections  # noqa: E402
from examples.rag.documents import Document, clean_text, load_documents  # noqa: E402
from examples.rag.errors import RagError  # noqa: E402

WORD = st.text(alphabet="abcdefghij", min_size=1, max_size=30)
SENTENCE = st.lists(WORD, min_size=1, max_size=12).map(lambda words: " ".join(words) + ".")
PARAGRAPH = st.lists(SENTENCE, min_size=1, max_size=8).map(" ".join)
TEXT = st.lists(PARAGRAPH, min_size=1, max_size=6).map("\n\n".join)


@settings(max_examples=60, deadline=None)
@given(text=TEXT, max_chars=st.integers(50, 400), overlap_fraction=st.floats(0, 0.5))
def test_chunks_fit_the_budget_and_keep_every_word_in_order(text, max_chars, overlap_fraction):
    overlap = int(max_chars * overlap_fraction)
    chunks = chunk_documents([Document("a.txt", text)], max_chars, overlap)
    assert all(0 < len(c.text) <= max_chars for c in chunks)
    assert [c.number for c in chunks] == list(range(1, len(chunks) + 1))
    # Read in order, each chunk goes on where the one before it stopped (after repeating its overlap), so the
    # document's words are a subsequence of the chunks' words; with no overlap they are exactly the chunks' words.
    words = text.split()
    chunk_words = iter([w for c in chunks for w in c.text.split()])
    assert all(any(w == x for x in chunk_words) for w in words)
    if overlap == 0:
        assert [w for c in chunks for w in c.text.split()] == words


def test_overlap_repeats_whole_sentences_of_the_chunk_before():
    text = " ".join(f"Sentence number {i} is here." for i in range(40))
    chunks = chunk_documents([Document("a.txt", text)], max_chars=200, overlap_chars=60)
    assert len(chunks) > 3
    for before, after in itertools.pairwise(chunks):
        first_sentence = after.text.split(". ")[0] + "."
        assert first_sentence in before.text  # the overlap: the start of a chunk ends the one before
        assert len(first_sentence) <= 60
    no_overlap = chunk_documents([Document("a.txt", text)], max_chars=200, overlap_chars=0)
    assert " ".join(c.text for c in no_overlap) == text


def test_sections_follow_headings_but_not_comments_in_code():
    text = "Intro line.\n\n# Install\n\n```bash\n# not a heading\npip install x\n```\n\n## Tips\n\n### Run\n\nRun it."
    assert [heading for heading, _ in split_sections(text)] == ["", "Install", "Run"]  # "## Tips" is empty
    chunks = chunk_documents([Document("a.md", text)], max_chars=500, overlap_chars=0)
    assert [(c.section, c.text.splitlines()[0]) for c in chunks] == [
        ("", "Intro line."),
        ("Install", "# Install"),
        ("Run", "### Run"),
    ]
    assert "# not a heading" in chunks[1].text


def test_a_word_longer_than_the_budget_is_cut():
    chunks = chunk_documents([Document("a.txt", "short " + "x" * 130 + " end")], max_chars=50, overlap_chars=0)
    assert all(len(c.text) <= 50 for c in chunks)
    assert "".join(c.text for c in chunks).replace(" ", "") == "short" + "x" * 130 + "end"


@pytest.mark.parametrize(("max_chars", "overlap"), [(10, 0), (100, 100), (100, -1)])
def test_bad_budgets_are_refused(max_chars, overlap):
    with pytest.raises(ValueError):
        chunk_documents([Document("a.txt", "text")], max_chars, overlap)


def test_clean_text_drops_images_and_tags_but_keeps_their_text():
    raw = '<div align="center">\n\n![image](https://x/y.png)\n\n</div>\n\n<Tip>\nUse **TGI**.\n</Tip>\r\n'
    assert clean_text(raw) == "Use **TGI**."


def test_load_documents_names_sources_relative_to_each_folder(tmp_path: Path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.md").write_text("# A\n\nalpha")
    (tmp_path / "docs" / "sub" / "b.txt").write_text("beta")
    (tmp_path / "docs" / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "docs" / "empty.md").write_text("<div></div>")
    (tmp_path / "c.md").write_text("gamma")
    documents = load_documents([tmp_path / "docs", tmp_path / "c.md"])
    assert [(d.source, d.text) for d in documents] == [
        ("a.md", "# A\n\nalpha"),
        ("sub/b.txt", "beta"),
        ("c.md", "gamma"),
    ]


def test_load_documents_says_what_is_missing(tmp_path: Path):
    with pytest.raises(RagError, match="no such documents folder"):
        load_documents([tmp_path / "nope"])
    (tmp_path / "only.png").write_bytes(b"")
    with pytest.raises(RagError, match="no documents"):
        load_documents([tmp_path])
