"""LLM without a tokenizer (vLLM's ``skip_tokenizer_init``, or a folder without tokenizer.json): token ids in,
token ids out with empty text, the same ids as with the tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from falconlm import LLM, SamplingParams
from falconlm.tokenizer import NoTokenizer, Tokenizer, load_tokenizer

PROMPTS = [[5, 17, 200, 3, 99], [42, 7], [1, 2, 3, 4, 5, 6, 8, 9, 10]]
PARAMS = [
    SamplingParams(max_tokens=10, temperature=0.0),
    SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=7, n=2, logprobs=2),
    SamplingParams(max_tokens=6, temperature=0.0, stop_token_ids=[11], ignore_eos=True),
]


@pytest.fixture(scope="module")
def with_tokenizer(tiny_checkpoint: Path) -> LLM:
    return LLM(tiny_checkpoint, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def weights_only(tiny_checkpoint: Path, tmp_path_factory) -> Path:
    """The tiny checkpoint's config and weights, without its tokenizer files."""
    folder = tmp_path_factory.mktemp("weights-only")
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(tiny_checkpoint / name, folder / name)
    return folder


def _ids(llm: LLM) -> list[list[tuple]]:
    outs = llm.generate(PROMPTS, PARAMS)
    return [[(c.token_ids, c.finish_reason, c.logprobs) for c in out.outputs] for out in outs]


def test_skip_tokenizer_init_gives_the_same_ids_with_empty_text(tiny_checkpoint: Path, with_tokenizer: LLM) -> None:
    llm = LLM(tiny_checkpoint, dtype="float32", device="cpu", skip_tokenizer_init=True)
    assert isinstance(llm.tokenizer, NoTokenizer)
    assert llm.tokenizer.eos_token_id == with_tokenizer.tokenizer.eos_token_id == 0
    assert _ids(llm) == _ids(with_tokenizer)
    outs = llm.generate(PROMPTS, PARAMS)
    assert all(c.text == "" for out in outs for c in out.outputs)
    assert [out.prompt_token_ids for out in outs] == PROMPTS
    assert any(c.text for out in with_tokenizer.generate(PROMPTS, PARAMS) for c in out.outputs)


def test_a_folder_without_tokenizer_files_runs_on_token_ids(weights_only: Path, with_tokenizer: LLM) -> None:
    llm = LLM(weights_only, dtype="float32", device="cpu")
    assert isinstance(llm.tokenizer, NoTokenizer)
    assert _ids(llm) == _ids(with_tokenizer)
    assert list(llm.stream(PROMPTS[0], SamplingParams(max_tokens=4))) == []


def test_text_needs_a_tokenizer(weights_only: Path) -> None:
    llm = LLM(weights_only, dtype="float32", device="cpu")
    with pytest.raises(ValueError, match=r"text prompts need a tokenizer, and .* has no tokenizer\.json; give the"):
        llm.generate("Once upon a time")
    with pytest.raises(ValueError, match="chat templates need a tokenizer"):
        llm.chat_prompt([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        llm.generate([PROMPTS[0]], SamplingParams(max_tokens=4, stop=["fox"]))


def test_load_tokenizer_chooses(tiny_checkpoint: Path, weights_only: Path) -> None:
    assert isinstance(load_tokenizer(tiny_checkpoint, 0), Tokenizer)
    skipped = load_tokenizer(tiny_checkpoint, 11, skip_tokenizer_init=True)
    assert isinstance(skipped, NoTokenizer) and skipped.eos_token_id == 11 and "skip_tokenizer_init" in skipped.reason
    assert skipped.decode([1, 2, 3]) == ""
    with pytest.raises(ValueError, match="skip_tokenizer_init; give the prompt as token ids"):
        skipped.encode("hello")
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        load_tokenizer(weights_only / "missing", 0)
