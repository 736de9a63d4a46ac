"""Batch invariance: with ``deterministic``, a request's greedy tokens and its seeded samples are the same whatever
else is in the batch, for bfloat16 and int4 weights. Random tiny weights make near-ties common, so any row whose
sums depended on its neighbours would soon flip a token. Prompt lengths and a small token budget make the
scheduler cut the prompts into different chunks in each batching."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from falconlm import LLM, SamplingParams
from falconlm.engine import fused_decode
from falconlm.engine.engine import Engine, EngineConfig
from falconlm.model.falcon import FalconForCausalLM
from falconlm.tokenizer import Tokenizer, load_tokenizer

from ..conftest import make_hf_checkpoint, needs_native
from ..model.falcon3_checkpoint import make_falcon3_checkpoint
from ..model.h1_checkpoints import save_hf_h1
from ..model.mamba_checkpoints import save_hf_mamba

PROMPTS = [[(7 * i + 3 * j) % 300 + 1 for j in range(5 + 9 * i)] for i in range(16)]  # 5 to 140 tokens
SMALL_VOCAB_PROMPTS = [[token % 90 + 3 for token in prompt] for prompt in PROMPTS]  # for vocabularies of 97
TOKENS = 16
GREEDY = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    # Wide enough that, on this CPU, the default path returned 1 of these 16 greedy requests differently when
    # batched; head_dim 128, so that decode steps run fused as they do for real models.
    folder = tmp_path_factory.mktemp("invariant-7b")
    return make_hf_checkpoint(folder, "7b", hidden_size=512, num_hidden_layers=4, max_position_embeddings=512)


@pytest.fixture(scope="module")
def falcon3_checkpoint(tmp_path_factory) -> Path:
    """Falcon3 (the Llama layout) as wide, with head_dim 128 and two query heads per KV head: its decode steps run
    fused too."""
    folder = tmp_path_factory.mktemp("invariant-falcon3")
    shape = {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4}
    return make_falcon3_checkpoint(folder, "gqa", **shape, head_dim=128, max_position_embeddings=512)


@pytest.fixture(scope="module")
def rw_checkpoint(tmp_path_factory) -> Path:
    """falcon-rw: ALiBi instead of rotary, a sequential block with biases, a KV group per head. Its decode rows run
    fused with the ALiBi bias table, its prompts' attention through the row kernel with the same table (batches of 3
    and 16 changed its tokens when prompts went through SDPA)."""
    folder = tmp_path_factory.mktemp("invariant-rw")
    return make_hf_checkpoint(
        folder, "rw", hidden_size=512, num_attention_heads=8, num_hidden_layers=4, max_position_embeddings=512
    )


@pytest.fixture(scope="module")
def recurrent_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Falcon-Mamba and Falcon-H1 checkpoints (vocabulary 97), random weights."""
    folder = tmp_path_factory.mktemp("recurrent")
    save_hf_mamba(folder / "mamba", hidden_size=256, num_hidden_layers=3)
    wide_h1 = dict(hidden_size=256, intermediate_size=384, mamba_d_ssm=256, mamba_n_heads=8, head_dim=32)
    return {"mamba": folder / "mamba", "h1": save_hf_h1(folder / "h1", **wide_h1)}


def _generate_in_batches(
    llm: LLM, batch: int, params: list[SamplingParams], prompts: list[list[int]] = PROMPTS
) -> list[tuple[list[int], list]]:
    """Each request's tokens and their logprobs (the sharper check: bits that seldom move a token)."""
    out = []
    for start in range(0, len(prompts), batch):
        outs = llm.generate(prompts[start : start + batch], params[start : start + batch])
        out += [(o.token_ids, o.logprobs) for o in outs]
    return out


def _check_batches_change_nothing(llm: LLM, prompts: list[list[int]] = PROMPTS) -> None:
    """Greedy requests alone, in batches of 3 and of 16, and seeded samples alone and in a batch of 16."""
    sampled = [
        SamplingParams(max_tokens=TOKENS, temperature=0.9, top_p=0.9, seed=i, ignore_eos=True, logprobs=0)
        for i in range(16)
    ]
    for params, batches in (([GREEDY] * 16, (3, 16)), (sampled, (16,))):
        alone = _generate_in_batches(llm, 1, params, prompts)
        assert all(len(tokens) == len(logprobs) == TOKENS for tokens, logprobs in alone)
        for batch in batches:
            assert _generate_in_batches(llm, batch, params, prompts) == alone, f"batches of {batch}"


@needs_native
@pytest.mark.parametrize(
    ("layout", "quantize"),
    [("7b", None), ("7b", "int4"), ("falcon3", None), ("falcon3", "int4"), ("rw", None), ("rw", "int4")],
)
def test_tokens_do_not_depend_on_the_batch(
    checkpoint: Path, falcon3_checkpoint: Path, rw_checkpoint: Path, layout: str, quantize: str | None
) -> None:
    folder = {"7b": checkpoint, "falcon3": falcon3_checkpoint, "rw": rw_checkpoint}[layout]
    _check_batches_change_nothing(
        LLM(folder, dtype="bfloat16", quantize=quantize, deterministic=True, max_num_batched_tokens=48)
    )


@needs_native
@pytest.mark.parametrize("quantize", [None, "int4"])
@pytest.mark.parametrize("layout", ["mamba", "h1"])
def test_recurrent_tokens_do_not_depend_on_the_batch(
    recurrent_checkpoints: dict[str, Path], layout: str, quantize: str | None
) -> None:
    # Decode rows share one batched state update, prompt chunks are cut differently in each batching.
    prompts = SMALL_VOCAB_PROMPTS
    folder = recurrent_checkpoints[layout]
    llm = LLM(
        folder, dtype="bfloat16", quantize=quantize, deterministic=True, max_num_batched_tokens=48,
        skip_tokenizer_init=True,
    )  # fmt: skip
    _check_batches_change_nothing(llm, prompts)


@needs_native
@pytest.mark.parametrize(
    ("layout", "quantize"),
    [
        ("7b", None), ("7b", "int4"), ("falcon3", None), ("falcon3-fused", None), ("falcon3-fused", "int4"),
        ("rw", None), ("rw", "int4"),
    ],
)  # fmt: skip
def test_a_prompt_cut_anywhere_scores_the_same(
    checkpoint: Path, rw_checkpoint: Path, tmp_path: Path, layout: str, quantize: str | None
) -> None:
    # Every token budget from 2 up cuts the prompt differently; several leave a last chunk of one token, which
    # looks like a decode row. Each prompt position's logprob and each new token's must be the same bits as with
    # the prompt in one chunk (a one-token last chunk once took the fused decode path while whole prompts took the
    # torch forward, and a server returned 1 of 24 streams differently). The tiny Falcon3's head_dim (16) is too
    # small for the fused step, so its decode rows and prompt chunks both take the torch forward; "falcon3-fused"
    # has head_dim 32, and its decode rows run fused, as falcon-rw's do (ALiBi's bias in the fused step and in the
    # row kernel that its prompt chunks take).
    folders = {"7b": checkpoint, "rw": rw_checkpoint}
    if layout in folders:
        folder = folders[layout]
    elif layout == "falcon3":
        folder = make_falcon3_checkpoint(tmp_path / "falcon3")
    else:
        wide_heads = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}
        folder = make_falcon3_checkpoint(tmp_path / "falcon3", **wide_heads)
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


@needs_native
@pytest.mark.parametrize("quantize", [None, "int4"])
@pytest.mark.parametrize("layout", ["mamba", "h1"])
def test_a_recurrent_prompt_cut_anywhere_leaves_the_same_state(
    recurrent_checkpoints: dict[str, Path], layout: str, quantize: str | None
) -> None:
    # Falcon-Mamba and Falcon-H1 carry a recurrent state from chunk to chunk. Cut anywhere, a prompt must leave
    # the same float32 state bits, and score and continue the same, as in one chunk: the conv and the Mamba-1
    # scan sum alike for a decode step and inside a chunk, and H1's chunked SSD form (whose sums depend on where
    # a chunk starts) gives way to the one-token update in deterministic mode. Comparing the float32 state is
    # what makes this sharp: bfloat16 activations hide most of such differences from the logprobs.
    folder = recurrent_checkpoints[layout]
    model = FalconForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, quantize=quantize)
    prompt = [(7 * j * j + 3 * j) % 90 + 3 for j in range(40)]  # past Mamba's 32-token scan chunks, H1's 8
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=0, prompt_logprobs=0)

    def run(budget: int) -> tuple[tuple[list[int], list, list], torch.Tensor]:
        config = EngineConfig(max_num_seqs=1, max_num_batched_tokens=budget, deterministic=True)
        engine = Engine(model, load_tokenizer(folder, None, skip_tokenizer_init=True), config)  # type: ignore[arg-type]
        out = engine.generate([prompt], [params])[0]
        return (out.token_ids, out.logprobs, out.prompt_logprobs), engine.runner.states.ssm[:, 0].clone()

    whole, whole_state = run(64)
    assert len(whole[1]) == 3 and whole_state.abs().sum() > 0
    for budget in (2, 3, 5, 8, 13, 31, 33, 39):  # 3 and 39 leave a one-token last chunk
        scores, state = run(budget)
        assert torch.equal(state, whole_state), f"state after the prompt (cut into chunks of {budget}) and 3 tokens"
        assert scores == whole, f"prompt cut into chunks of {budget}"


@needs_native
@pytest.mark.parametrize(("layout", "quantize"), [("7b", None), ("7b", "int4"), ("h1", None)])
def test_a_preempted_request_scores_the_same(
    checkpoint: Path, recurrent_checkpoints: dict[str, Path], layout: str, quantize: str | None
) -> None:
    # A KV pool with room for one request at a time preempts the newest ones: each recomputes its prompt and the
    # tokens it had made as a prompt. In deterministic mode those take the path they took the first time, so every
    # request's tokens and logprobs must equal those of the same request run alone in a roomy pool.
    folder = checkpoint if layout == "7b" else recurrent_checkpoints[layout]
    model = FalconForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, quantize=quantize)
    tokenizer = load_tokenizer(folder, None, skip_tokenizer_init=True)
    prompts = SMALL_VOCAB_PROMPTS[4:10]  # 41 to 86 tokens
    params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True, logprobs=0)

    def run(num_blocks: int, together: bool) -> tuple[list, int]:
        config = EngineConfig(
            block_size=16, num_blocks=num_blocks, max_num_batched_tokens=64, deterministic=True,
            enable_prefix_caching=False,
        )  # fmt: skip
        engine = Engine(model, tokenizer, config)  # type: ignore[arg-type]
        batches = [prompts] if together else [[prompt] for prompt in prompts]
        outs = [out for batch in batches for out in engine.generate(batch, [params] * len(batch))]
        return [(out.token_ids, out.logprobs) for out in outs], engine.scheduler.num_preemptions

    alone, _ = run(64, together=False)
    tight, preemptions = run(-(-(max(map(len, prompts)) + TOKENS) // 16), together=True)
    assert preemptions > 0
    assert tight == alone


@needs_native
@pytest.mark.parametrize("quantize", [None, "int4"])
def test_a_step_run_in_parts_scores_the_same(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch, quantize: str | None
) -> None:
    # A fused step of more rows than MAX_CALL_ROWS (deterministic prompt chunks) runs as several native calls, to
    # bound its scratch; the rows of a later call read the K/V that an earlier call stored. Four prompts in one
    # step of 218 rows, in calls of 5 rows, must score as in one call.
    model = FalconForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, quantize=quantize)
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    prompts = PROMPTS[4:8]  # 41 to 68 tokens
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=0, prompt_logprobs=0)

    def run() -> list:
        config = EngineConfig(max_num_batched_tokens=512, deterministic=True, enable_prefix_caching=False)
        outs = Engine(model, tokenizer, config).generate(prompts, [params] * len(prompts))
        return [(out.token_ids, out.logprobs, out.prompt_logprobs) for out in outs]

    whole = run()
    monkeypatch.setattr(fused_decode, "MAX_CALL_ROWS", 5)
    assert run() == whole


@needs_native
@pytest.mark.parametrize("quantize", [None, "int4"])
def test_decode_rows_and_a_prompt_chunk_share_one_head_call(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch, quantize: str | None
) -> None:
    # Outside deterministic mode a step's decode rows and its prompt chunks are separate forwards (the fused step
    # and the prompt path), but their rows meet the output head in one call. That is only sound if each row's
    # logits are the same bits as that row's head call alone: checked here for every merged call.
    model = FalconForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, quantize=quantize)
    # one model step per schedule: a decode run's later steps are head calls of their own
    config = EngineConfig(max_num_batched_tokens=32, enable_prefix_caching=False, num_scheduler_steps=1)
    engine = Engine(model, load_tokenizer(checkpoint, None, skip_tokenizer_init=True), config)  # type: ignore[arg-type]
    runner, compute_logits = engine.runner, model.compute_logits
    forwards: list[int] = []  # per step
    heads: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per step: each head call's states and logits

    def count_forwards(*args, **kwargs):
        forwards[-1] += 1
        return forward(*args, **kwargs)

    def record_head(states: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        logits = compute_logits(states, rows)
        heads[-1].append((states.clone(), logits.clone()))
        return logits

    def step(scheduled):
        forwards.append(0)
        heads.append([])
        return execute(scheduled)

    forward, execute = runner._forward, runner.execute
    monkeypatch.setattr(runner, "_forward", count_forwards)
    monkeypatch.setattr(runner, "execute", step)
    monkeypatch.setattr(model, "compute_logits", record_head)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    engine.generate([PROMPTS[2], PROMPTS[5]], [params, params])  # 23 and 50 tokens: decode rows beside a chunk
    assert all(len(calls) <= 1 for calls in heads)
    # steps with decode rows and a prompt chunk that both reached the head (the prompt's last chunk)
    merged = [i for i, n in enumerate(forwards) if n == 2 and heads[i] and heads[i][0][0].shape[0] >= 2]
    assert merged, "no step sampled decode rows and a prompt's last chunk together"
    with torch.inference_mode():
        for i in merged:
            ((states, logits),) = heads[i]
            for row in range(states.shape[0]):
                alone = compute_logits(states[row : row + 1])
                assert torch.equal(alone, logits[row : row + 1]), f"step {i} row {row}"
