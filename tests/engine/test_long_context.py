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
from transformers.models.falcon.modeling_falcon import FalconRotaryEmbedding

from falconlm import FalconForCausalLM
from falconlm.engine.engine import Engine, EngineConfig
from falconlm.engine.fused_decode import fused_decoder
from falconlm.engine.sampling_params import SamplingParams
from falconlm.quant import load_quantized
from falconlm.tokenizer import Tokenizer

from ..conftest import make_hf_checkpoint, needs_native

PROMPT_LEN = 8200  # past 8,192
STEPS = 4
BUDGET = 1000  # tokens per engine step: the prompt takes 9 chunks, none aligned to the 16-token blocks
TOL = 2e-4
# Over 8k-token prompts float32 differs by more, and by how much depends on the BLAS kernels (MKL capped at AVX2,
# as on an AVX2-only CPU: up to 3.6e-4 on logits of magnitude 27, against 1.3e-4 with AVX-512). The long cases
# allow this fraction of the case's largest |logit|, about 5e-4 for them; a wrong position or scale moves logits
# by O(1).
LONG_TOL = 2e-5

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
    prompt = torch.randint(1, ref.config.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(7))
    logits, tokens, logprobs = hf_greedy(ref, prompt.tolist(), STEPS)
    return prompt.tolist(), logits, tokens, logprobs


def hf_greedy(ref: HFModel, prompt: list[int], steps: int) -> tuple[torch.Tensor, list[int], list[float]]:
    """The prompt's logits [P, vocab] and ``steps`` greedy tokens with their logprobs, by the loop ``generate``
    runs: the prompt in one forward, then one token at a time with the cache. The rotary module starts fresh, as
    in a newly loaded model: transformers keeps dynamic-NTK frequencies from an earlier, longer call."""
    ref.transformer.rotary_emb = FalconRotaryEmbedding(ref.config)
    out = ref(torch.tensor([prompt]), use_cache=True)
    logits, cache = out.logits[0], out.past_key_values
    tokens, logprobs = [], []
    step = logits[-1]
    for _ in range(steps):
        token = int(step.argmax())
        tokens.append(token)
        logprobs.append(float(step.log_softmax(-1)[token]))
        out = ref(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        step, cache = out.logits[0, -1], out.past_key_values
    return logits, tokens, logprobs


def long_tol(ref_logits: torch.Tensor) -> float:
    """What the long cases allow: LONG_TOL of the case's largest |logit|."""
    return LONG_TOL * float(ref_logits.abs().max())


def test_dense_forward_matches_past_8k(long_case):
    name, path, prompt, ref_logits, _, _ = long_case
    ours = FalconForCausalLM.from_pretrained(path, dtype=torch.float32)
    logits = ours(torch.tensor([prompt]))[0]
    diff = (logits - ref_logits).abs().max().item()
    past = (logits[8192:] - ref_logits[8192:]).abs().max().item()
    tol = long_tol(ref_logits)
    assert diff <= tol and past <= tol, f"{name}: max |logit diff| {diff} (past 8k: {past}, allowed {tol:.1e})"


def test_engine_chunked_prefill_and_decode_match_past_8k(long_case):
    name, path, prompt, ref_logits, ref_tokens, ref_logprobs = long_case
    assert len(set(ref_tokens)) > 1  # greedy decoding has not collapsed into one repeated token
    model = FalconForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = EngineConfig(max_num_seqs=2, max_num_batched_tokens=BUDGET, max_model_len=PROMPT_LEN + 16)
    engine = Engine(model, Tokenizer.from_pretrained(path), config)
    params = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True, logprobs=0, prompt_logprobs=0)
    out = engine.generate([prompt], [params])[0]
    assert engine.num_steps > PROMPT_LEN // BUDGET  # the prompt really went in chunks (decode steps may run together)
    assert out.token_ids == ref_tokens, f"{name}: engine {out.token_ids} vs transformers {ref_tokens}"
    got = torch.tensor([lp.logprob for lp in out.logprobs])
    tol = long_tol(ref_logits)
    assert (got - torch.tensor(ref_logprobs)).abs().max().item() <= tol, name
    expected = ref_logits[:-1].log_softmax(-1).gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    prompt_lp = torch.tensor([lp.logprob for lp in out.prompt_logprobs[1:]])
    diff = (prompt_lp - expected).abs()
    assert diff.max().item() <= tol, f"{name}: prompt logprob diff {diff.max().item()} at {int(diff.argmax()) + 1}"


# ---- the engine's per-request dynamic scaling, small and fast --------------------------------------------------

SMALL = {**WIDE, "hidden_size": 32, "num_attention_heads": 2, "max_position_embeddings": 64}


def _small_engine(path, **config) -> Engine:
    model = FalconForCausalLM.from_pretrained(path, dtype=torch.float32)
    settings = {"max_num_seqs": 4, "max_num_batched_tokens": 48, "block_size": 8, "max_model_len": 256, **config}
    return Engine(model, Tokenizer.from_pretrained(path), EngineConfig(**settings))


def test_rows_of_different_lengths_each_match_their_own_transformers_run(tmp_path):
    # Dynamic NTK depends on the sequence length; in one engine step each row uses its own (positions.py).
    scaling = {"type": "dynamic", "factor": 4.0}
    path = make_hf_checkpoint(tmp_path, "7b", **SMALL, rope_scaling=scaling)
    ref = HFModel.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 320, (n,), generator=gen).tolist() for n in (150, 97, 40)]  # two past 64
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0)
    outs = _small_engine(path).generate(prompts, [params] * 3)
    for prompt, out in zip(prompts, outs, strict=True):
        _, tokens, logprobs = hf_greedy(ref, prompt, 6)
        assert out.token_ids == tokens
        assert max(abs(a.logprob - b) for a, b in zip(out.logprobs, logprobs, strict=True)) <= TOL
    # hf_greedy is what generate() does (for a fresh model; see its docstring).
    ref.transformer.rotary_emb = FalconRotaryEmbedding(ref.config)
    generated = ref.generate(torch.tensor([prompts[1]]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert generated[0, len(prompts[1]) :].tolist() == outs[1].token_ids


@pytest.mark.parametrize("kind", ["linear", "dynamic"])
def test_prefix_cache_shares_a_document_only_where_its_keys_are_the_same(tmp_path, kind):
    # Two questions on one 120-token document, one after the other. Linear scaling rotates a position the same way
    # whatever follows, so the second request reuses the document's blocks; dynamic scaling rotates a long prompt
    # by its own length, so the blocks of a prompt of another length are not reused (they would differ from
    # transformers).
    path = make_hf_checkpoint(tmp_path, "7b", **SMALL, rope_scaling={"type": kind, "factor": 4.0})
    ref = HFModel.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    gen = torch.Generator().manual_seed(5)
    document = torch.randint(1, 320, (120,), generator=gen).tolist()
    questions = [torch.randint(1, 320, (n,), generator=gen).tolist() for n in (30, 11)]
    engine = _small_engine(path)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=0)
    hits = []
    for question in questions:
        before = engine.kv_cache_manager.num_prefix_hit_tokens
        out = engine.generate([document + question], [params])[0]
        hits.append(engine.kv_cache_manager.num_prefix_hit_tokens - before)
        _, tokens, logprobs = hf_greedy(ref, document + question, 5)
        assert out.token_ids == tokens
        assert max(abs(a.logprob - b) for a, b in zip(out.logprobs, logprobs, strict=True)) <= TOL
    assert hits[0] == 0
    assert hits[1] == (120 if kind == "linear" else 0)
    # The same prompt again is a hit either way (its keys were written with the same length).
    engine.generate([document + questions[1]], [params])
    assert engine.kv_cache_manager.num_prefix_hit_tokens > sum(hits)


@needs_native
def test_fused_decode_steps_at_8k_with_dynamic_scaling(tmp_path, monkeypatch):
    # The native fused step (every layer in one call; rows over 512 positions split between threads) reads each
    # row's rotary tables from Python; with two rows of different lengths past 8k it must equal the torch path.
    path = make_hf_checkpoint(
        tmp_path, "7b", hidden_size=128, max_position_embeddings=2048, rope_scaling={"type": "dynamic", "factor": 8.0}
    )
    model = load_quantized(path, quantize="int4", dtype=torch.float32)
    assert fused_decoder(model.transformer) is not None
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(1, 320, (n,), generator=gen).tolist() for n in (8200, 2500)]
    params = [SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=0)] * 2
    config = EngineConfig(max_num_seqs=2, max_num_batched_tokens=8192, max_model_len=8256, enable_prefix_caching=False)
    tok = Tokenizer.from_pretrained(path)
    fused = Engine(model, tok, config).generate(prompts, params)
    monkeypatch.setenv("FALCONLM_FUSED_DECODE", "0")
    plain = Engine(model, tok, config).generate(prompts, params)
    for a, b in zip(fused, plain, strict=True):
        assert a.token_ids == b.token_ids
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs, strict=True)) <= 1e-3


@pytest.mark.parametrize("variant", ["rw", "7b"])
def test_a_long_chunk_is_attended_in_blocks_of_queries_with_the_same_result(tmp_path, monkeypatch, variant):
    # One 8k-token chunk of a 32-head ALiBi model would need a [32, 8k, 8k] mask; the chunk path bounds it by
    # attending blocks of queries. Tiny blocks here (down to one query) must give what one block gives.
    from falconlm.model import paged_attention

    path = make_hf_checkpoint(tmp_path, variant, **{**SMALL, "max_position_embeddings": 256})
    prompt = torch.randint(1, 320, (200,), generator=torch.Generator().manual_seed(4)).tolist()
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=0, prompt_logprobs=0)
    runs = []
    for elements in (1 << 24, 2 * 200, 1):
        monkeypatch.setattr(paged_attention, "MASK_ELEMENTS", elements)
        runs.append(_small_engine(path, max_num_batched_tokens=150).generate([prompt], [params])[0])
    first = [lp.logprob for lp in runs[0].prompt_logprobs[1:]] + [lp.logprob for lp in runs[0].logprobs]
    for other in runs[1:]:
        assert other.token_ids == runs[0].token_ids
        got = [lp.logprob for lp in other.prompt_logprobs[1:]] + [lp.logprob for lp in other.logprobs]
        assert max(abs(a - b) for a, b in zip(got, first, strict=True)) <= TOL  # float32 rounding only
