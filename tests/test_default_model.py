"""The embedded default model: it ships, loads, agrees with its tokenizer, and keeps its card's perplexity."""

from __future__ import annotations

import json
import re

import pytest

from falconlm import LLM, FalconConfig, SamplingParams, Tokenizer, default_model_path
from falconlm.cli import main

CARD = default_model_path() / "MODEL_CARD.md"


def test_config_and_tokenizer_agree():
    path = default_model_path()
    config = FalconConfig.from_pretrained(path)
    tok = Tokenizer.from_pretrained(path)
    assert config.vocab_size == tok.vocab_size
    assert config.eos_token_id == tok.eos_token_id == tok.token_to_id("<|endoftext|>")
    assert config.num_kv_groups == 1 and config.parallel_attn  # Falcon-7B layout
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert size <= 25 * 10**6, f"shipped weights are {size} bytes, over the 25 MB budget"


def test_greedy_story_is_english():
    llm = LLM(dtype="float32")
    out = llm.generate(["Once upon a time"], SamplingParams(max_tokens=40, temperature=0.0))[0]
    words = re.findall(r"[A-Za-z]+", out.text)
    assert len(words) >= 15
    common = {"the", "a", "and", "to", "was", "he", "she", "they", "it", "in", "her", "his", "said"}
    assert sum(w.lower() in common for w in words) >= 4, out.text


def test_card_perplexity_holds_on_a_slice(shared_data, capsys):
    claimed = float(re.search(r"Final validation perplexity: \*\*([0-9.]+)\*\*", CARD.read_text()).group(1))
    assert 5 < claimed < 100
    held_out = shared_data / "tinystories" / "TinyStories-valid-v1.first-794KB.txt"
    code = main(
        ["eval-ppl", "--data", str(held_out), "--max-tokens", "6000", "--context", "256", "--stride", "128", "--json"]
    )
    assert code == 0
    measured = json.loads(capsys.readouterr().out)["perplexity"]
    assert measured < claimed * 1.25, f"perplexity {measured:.2f} on a slice, card says {claimed}"


@pytest.mark.parametrize("command", [["info"], ["generate", "--max-tokens", "5", "--temperature", "0", "Once"]])
def test_commands_default_to_the_embedded_model(command, capsys):
    assert main(command) == 0
    assert capsys.readouterr().out.strip()
