"""Prompts past 8k tokens: float32 logits and greedy tokens equal transformers' on tiny random checkpoints.

Each case builds a random transformers checkpoint whose scaled context reaches past 8,192 positions (a Falcon-7B
shape with linear and with dynamic-NTK RoPE scaling from ``max_position_embeddings`` 2048, a falcon-rw shape with
ALiBi, a 40B-style grouped-query shape), and checks at positions 0 .. 8,200+:

* the dense forward's logits against transformers' (SDPA) forward;
* the engine: the prompt in chunked prefill (a token budget that does not divide the prompt or the block size),
  its prompt logprobs against transformers' log-softmax, then greedy decode steps whose tokens and logprobs equal
  transformers' incremental decoding (prefill, then one token at a time with its cache: what ``generate`` runs).

The models are a few hidden units wide and their weights are drawn wider than usual (``initializer_range``) so
greedy decoding does not collapse into one repeated token.
"""

from __future__ import annotations

import pytest
import torch
from transformers import FalconForCausalLM as HFModel

from falconlm import FalconForCausalLM
from falconlm.engine.engine import Engine, EngineConfig
from falconlm.engine.sampling_params import SamplingParams
from falconlm.tokenizer import Tokenizer

from ..conftest import make_hf_checkpoint

PROMPT_LEN = 8200  # past 8,192
STEPS = 4
BUDGET = 1000  # tokens per engine step: the prompt takes 9 chunks, none aligned to the 16-token blocks
TOL = 2e-4
WIDE = {"initializer_range": 1.0, "num_hidden_layers": 2}

CASES = {
    "7b-linear": ("7b", {"hidden_size": 32, "num_attention_heads": 2, "max_position_embeddings": 2048,
                         "rope_scaling": {"type": "linear", "factor": 8.0}}),
    "7b-dynamic": ("7b", {"hidden_size": 32, "num_attention_heads": 2, "max_position_embeddings": 2048,
                          "rope_scaling": {"type": "dynamic", "factor": 8.0}}),
    "rw-alibi": ("rw", {"hidden_size": 24, "num_attention_heads": 3, "max_position_embeddings": 16384}),
    "40b-gqa": ("40b", {"hidden_size": 64, "num_attention_heads": 4, "num_kv_heads": 2,
                        "max_position_embeddings": 4096, "rope_scaling": {"type": "dynamic", "factor": 4.0}}),
}  # fmt: skip


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module", params=sorted(CASES))
def long_case(request, tmp_path_factory):
    """(name, checkpoint folder, prompt, transformers' prompt logits [P, vocab], greedy tokens, their logprobs)."""
    name = request.param
    variant, overrides = CASES[name]
    path = make_hf_checkpoint(tmp_path_factory.mktemp(name), variant, **{**WIDE, **overrides})
    with torch.no_grad():
        return (name, path, *_reference(path))


def _reference(path):
    """transformers' view of a random prompt: its logits, then greedy tokens and their logprobs."""
    ref = HFModel.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    vocab = ref.config.vocab_size
    prompt = torch.randint(1, vocab, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(7))
    out = ref(prompt, use_cache=True)
    logits, cache = out.logits[0], out.past_key_values
    tokens, logprobs = [], []
    step = logits[-1]
    for _ in range(STEPS):  # generate()'s loop: one token at a time, positions from the cache
        token = int(step.argmax())
        tokens.append(token)
        logprobs.append(float(step.log_softmax(-1)[token]))
        out = ref(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        step, cache = out.logits[0, -1], out.past_key_values
    return prompt[0].tolist(), logits, tokens, logprobs


def test_dense_forward_matches_past_8k(long_case):
    name, path, prompt, ref_logits, _, _ = long_case
    ours = FalconForCausalLM.from_pretrained(path, dtype=torch.float32)
    logits = ours(torch.tensor([prompt]))[0]
    diff = (logits - ref_logits).abs().max().item()
    past = (logits[8192:] - ref_logits[8192:]).abs().max().item()
    assert diff <= TOL and past <= TOL, f"{name}: max |logit diff| {diff} (past 8k: {past})"


def test_engine_chunked_prefill_and_decode_match_past_8k(long_case):
    name, path, prompt, ref_logits, ref_tokens, ref_logprobs = long_case
    assert len(set(ref_tokens)) > 1  # greedy decoding has not collapsed into one repeated token
    model = FalconForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = EngineConfig(max_num_seqs=2, max_num_batched_tokens=BUDGET, max_model_len=PROMPT_LEN + 16)
    engine = Engine(model, Tokenizer.from_pretrained(path), config)
    params = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True, logprobs=0, prompt_logprobs=0)
    out = engine.generate([prompt], [params])[0]
    assert engine.num_steps >= PROMPT_LEN // BUDGET + STEPS  # the prompt really went in chunks
    assert out.token_ids == ref_tokens, f"{name}: engine {out.token_ids} vs transformers {ref_tokens}"
    got = torch.tensor([lp.logprob for lp in out.logprobs])
    assert (got - torch.tensor(ref_logprobs)).abs().max().item() <= TOL, name
    expected = ref_logits[:-1].log_softmax(-1).gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    prompt_lp = torch.tensor([lp.logprob for lp in out.prompt_logprobs[1:]])
    diff = (prompt_lp - expected).abs()
    assert diff.max().item() <= TOL, f"{name}: prompt logprob diff {diff.max().item()} at {int(diff.argmax()) + 1}"
