"""Batch invariance: with ``deterministic``, a request's greedy tokens and its seeded samples are the same whatever
else is in the batch, for bfloat16 and int4 weights. Random tiny weights make near-ties common, so any row whose
sums depended on its neighbours would soon flip a token. Prompt lengths and a small token budget make the
scheduler cut the prompts into different chunks in each batching."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from falconlm import LLM, SamplingParams
from falconlm.engine.engine import Engine, EngineConfig
from falconlm.model.falcon import FalconForCausalLM
from falconlm.tokenizer import Tokenizer

from ..conftest import make_hf_checkpoint, needs_native
from ..model.falcon3_checkpoint import make_falcon3_checkpoint

PROMPTS = [[(7 * i + 3 * j) % 300 + 1 for j in range(5 + 9 * i)] for i in range(16)]  # 5 to 140 tokens
TOKENS = 16
GREEDY = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    # Wide enough that, on this CPU, the default path returned 1 of these 16 greedy requests differently when
    # batched; head_dim 128, so that decode steps run fused as they do for real models.
    folder = tmp_path_factory.mktemp("invariant-7b")
    return make_hf_checkpoint(folder, "7b", hidden_size=512, num_hidden_layers=4, max_position_embeddings=512)


def _generate_in_batches(llm: LLM, batch: int, params: list[SamplingParams]) -> list[list[int]]:
    out = []
    for start in range(0, len(PROMPTS), batch):
        outs = llm.generate(PROMPTS[start : start + batch], params[start : start + batch])
        out += [o.token_ids for o in outs]
    return out


@needs_native
@pytest.mark.parametrize("quantize", [None, "int4"])
def test_tokens_do_not_depend_on_the_batch(checkpoint: Path, quantize: str | None) -> None:
    llm = LLM(checkpoint, dtype="bfloat16", quantize=quantize, deterministic=True, max_num_batched_tokens=48)
    sampled = [
        SamplingParams(max_tokens=TOKENS, temperature=0.9, top_p=0.9, seed=i, ignore_eos=True) for i in range(16)
    ]
    for params, batches in (([GREEDY] * 16, (3, 16)), (sampled, (16,))):
        alone = _generate_in_batches(llm, 1, params)
        assert all(len(tokens) == TOKENS for tokens in alone)
        for batch in batches:
            assert _generate_in_batches(llm, batch, params) == alone, f"batches of {batch}"


@needs_native
@pytest.mark.parametrize(("layout", "quantize"), [("7b", None), ("7b", "int4"), ("falcon3", None)])
def test_a_prompt_cut_anywhere_scores_the_same(
    checkpoint: Path, tmp_path: Path, layout: str, quantize: str | None
) -> None:
    # Every token budget from 2 up cuts the prompt differently; several leave a last chunk of one token, which
    # looks like a decode row. Each prompt position's logprob and each new token's must be the same bits as with
    # the prompt in one chunk (a one-token last chunk once took the fused decode path while whole prompts took the
    # torch forward, and a server returned 1 of 24 streams differently). Falcon3 (Llama layout) has no fused step:
    # its decode rows and prompt chunks both take the torch forward.
    folder = checkpoint if layout == "7b" else make_falcon3_checkpoint(tmp_path / "falcon3")
    model = FalconForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, quantize=quantize)
    tokenizer = Tokenizer.from_pretrained(folder)
    prompt = PROMPTS[1]  # 14 tokens
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=0, prompt_logprobs=0)

    def scores(budget: int) -> tuple[list[int], list, list]:
        config = EngineConfig(
            max_num_seqs=1, max_num_batched_tokens=budget, num_blocks=4, deterministic=True, enable_prefix_caching=False
        )
        out = Engine(model, tokenizer, config).generate([prompt], [params])[0]
        return out.token_ids, out.logprobs, out.prompt_logprobs

    whole = scores(len(prompt))
    assert len(whole[2]) == len(prompt)
    for budget in range(2, len(prompt)):
        assert scores(budget) == whole, f"prompt cut into chunks of {budget}"
