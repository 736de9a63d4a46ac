"""Embedding requests in the engine, judged by transformers' final hidden states (after ``ln_f``) on the same
random checkpoint: last / mean / cls pooling, with and without normalisation, batched inputs of different
lengths equal to each alone, no KV block touched, generation unchanged beside them, the step's token share."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import FalconModel as HFModel

from falconlm import FalconForCausalLM
from falconlm.engine.embedding import MIN_SHARE
from falconlm.engine.engine import Engine, EngineConfig
from falconlm.engine.errors import InvalidRequestError, TokenIdOutOfVocabError
from falconlm.engine.pooling import PoolingConfig, PoolingParams
from falconlm.engine.sampling_params import SamplingParams
from falconlm.engine.scheduler import QueueFullError
from falconlm.tokenizer import Tokenizer

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [1, 2, 3, 4, 5, 6, 7], list(range(20, 61)), [300]]


def _engine(path, **config) -> Engine:
    model = FalconForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return Engine(model, Tokenizer.from_pretrained(path), EngineConfig(max_num_seqs=4, **config))


def _reference(path, prompts, pooling: str, normalize: bool) -> list[torch.Tensor]:
    """transformers' last hidden state (``hidden_states[-1]``, after ln_f) of each prompt alone, pooled."""
    ref = HFModel.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="sdpa").eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            states = ref(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]  # [T, H]
            vector = {"last": states[-1], "mean": states.mean(0), "cls": states[0]}[pooling]
            out.append(F.normalize(vector, dim=-1) if normalize else vector)
    return out


def _embed(engine: Engine, prompts, params: PoolingParams, prefix: str = "e") -> list[torch.Tensor]:
    ids = [f"{prefix}{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts, strict=True):
        engine.add_request(request_id, prompt, params)
    got = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.finished and out.text == "" and out.token_ids == []
            got[out.request_id] = torch.tensor(out.embedding)
    return [got[i] for i in ids]


@pytest.mark.parametrize(("pooling", "normalize"), [("last", True), ("last", False), ("mean", True), ("mean", False)])
def test_embeddings_match_transformers_hidden_states(hf_checkpoint, pooling, normalize):
    variant, path = hf_checkpoint
    engine = _engine(path)
    got = _embed(engine, PROMPTS, PoolingParams(pooling_type=pooling, normalize=normalize))
    for i, (vector, expected) in enumerate(zip(got, _reference(path, PROMPTS, pooling, normalize), strict=True)):
        assert vector.shape == (engine.model.config.hidden_size,)
        diff = (vector - expected).abs().max().item()
        assert diff <= 1e-5, f"{variant} {pooling} normalize={normalize} prompt {i}: max diff {diff}"
        if normalize:
            assert abs(vector.norm().item() - 1) < 1e-5


def test_cls_pooling_and_the_models_default(tiny_checkpoint):
    engine = _engine(tiny_checkpoint, pooling=PoolingConfig("cls", normalize=False))
    got = _embed(engine, PROMPTS[:2], PoolingParams())  # the engine's default: cls, not normalised
    for vector, expected in zip(got, _reference(tiny_checkpoint, PROMPTS[:2], "cls", False), strict=True):
        assert torch.allclose(vector, expected, atol=1e-5)


def test_a_batch_equals_each_input_alone(tiny_checkpoint):
    engine = _engine(tiny_checkpoint)
    params = PoolingParams(pooling_type="mean")
    together = _embed(engine, PROMPTS, params)
    for i, prompt in enumerate(PROMPTS):
        alone = _embed(engine, [prompt], params, prefix=f"alone{i}-")[0]
        assert torch.allclose(together[i], alone, atol=1e-6), f"prompt {i}"


def test_dimensions_keep_the_first_components_renormalised(tiny_checkpoint):
    engine = _engine(tiny_checkpoint)
    full = _embed(engine, PROMPTS[:1], PoolingParams(normalize=False))[0]
    short = _embed(engine, PROMPTS[:1], PoolingParams(dimensions=8), prefix="d")[0]
    assert short.shape == (8,)
    assert torch.allclose(short, F.normalize(full[:8], dim=-1), atol=1e-6)
    raw = _embed(engine, PROMPTS[:1], PoolingParams(dimensions=8, normalize=False), prefix="r")[0]
    assert torch.allclose(raw, full[:8])


def test_embeddings_take_no_kv_blocks_and_leave_the_prefix_cache_alone(tiny_checkpoint):
    engine = _engine(tiny_checkpoint)
    before = engine.stats()
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"e{i}", prompt, PoolingParams())
    assert engine.stats().num_waiting == len(PROMPTS)
    while engine.has_unfinished():
        engine.step()
        assert engine.stats().num_free_blocks == before.num_free_blocks
    after = engine.stats()
    assert after.num_prefix_query_tokens == before.num_prefix_query_tokens == 0
    assert engine.kv_cache_manager.block_pool.hash_to_block == {}  # nothing written to the prefix cache


def test_generation_beside_embeddings_is_unchanged(tiny_checkpoint):
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = _engine(tiny_checkpoint).generate([PROMPTS[0], PROMPTS[3]], [greedy, greedy])
    engine = _engine(tiny_checkpoint)
    engine.add_request("g0", PROMPTS[0], greedy)
    engine.add_request("g1", PROMPTS[3], greedy)
    tokens: dict[str, list[int]] = {"g0": [], "g1": []}
    embeddings = {}
    added = False
    while engine.has_unfinished():
        for out in engine.step():
            if out.embedding is not None:
                assert not all(len(t) == 12 for t in tokens.values())  # generation still under way
                embeddings[out.request_id] = torch.tensor(out.embedding)
            else:
                tokens[out.request_id] += out.token_ids
        if not added:  # after the first step: generation runs when the embeddings arrive
            for i, prompt in enumerate(PROMPTS):
                engine.add_request(f"e{i}", prompt, PoolingParams())
            added = True
    assert [tokens["g0"], tokens["g1"]] == [o.token_ids for o in alone]
    expected = _embed(_engine(tiny_checkpoint), PROMPTS, PoolingParams())
    for i in range(len(PROMPTS)):
        assert torch.allclose(embeddings[f"e{i}"], expected[i], atol=1e-6)


def test_each_step_gives_embeddings_the_leftover_or_a_quarter_of_the_budget(tiny_checkpoint):
    budget = 32
    engine = _engine(tiny_checkpoint, max_num_batched_tokens=budget)
    engine.embedder.step = _recording(engine.embedder.step, calls := [])
    long_prompt = list(range(1, 101))  # longer than the budget: runs alone
    engine.add_request("g", list(range(1, 80)), SamplingParams(max_tokens=4, ignore_eos=True))
    for i in range(6):
        engine.add_request(f"e{i}", [7] * 10, PoolingParams())
    engine.add_request("long", long_prompt, PoolingParams())
    engine.add_request("after", [8] * 5, PoolingParams())
    while engine.has_unfinished():
        engine.step()
    share = budget // MIN_SHARE
    steps = [(left, [o.num_prompt_tokens for o in outs]) for left, outs in calls]
    assert steps[0] == (0, [10])  # a full prefill chunk took the budget: the quarter share (8) takes one input
    for left, sizes in steps:
        allowed = max(left, share)
        assert sum(sizes) <= allowed or len(sizes) == 1, (left, sizes)
    assert (100,) in [tuple(sizes) for _, sizes in steps]  # the long input ran alone
    done = [o.request_id for _, outs in calls for o in outs]
    assert done == [f"e{i}" for i in range(6)] + ["long", "after"]  # FIFO


def _recording(step, calls: list):
    def wrapper(tokens_left: int):
        outs = step(tokens_left)
        calls.append((tokens_left, outs))
        return outs

    return wrapper


def test_bad_embedding_requests_are_refused_by_name(tiny_checkpoint):
    engine = _engine(tiny_checkpoint, max_model_len=64)
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("a", list(range(1, 66)), PoolingParams())
    assert info.value.param == "prompt" and "context of 64" in str(info.value)
    engine.add_request("full", list(range(1, 65)), PoolingParams())  # the whole context is fine (no output token)
    with pytest.raises(InvalidRequestError, match="hidden size") as info:
        engine.add_request("b", [1, 2], PoolingParams(dimensions=65))
    assert info.value.param == "dimensions"
    with pytest.raises(TokenIdOutOfVocabError):
        engine.add_request("c", [1, 320], PoolingParams())
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("d", [], PoolingParams())
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("full", [1], PoolingParams())
    with pytest.raises(ValueError, match="dimensions"):
        PoolingParams(dimensions=0)
    with pytest.raises(ValueError, match="pooling_type"):
        PoolingParams(pooling_type="max")
    engine.abort("full")
    assert not engine.has_unfinished()


def test_an_embed_task_engine_refuses_generation_and_holds_one_sequence_of_kv(tiny_checkpoint):
    engine = _engine(tiny_checkpoint, task="embed", block_size=16)
    assert engine.stats().num_blocks == -(-engine.max_model_len // 16)
    with pytest.raises(InvalidRequestError, match="embeddings only"):
        engine.add_request("g", [1, 2], SamplingParams(max_tokens=2))
    assert len(_embed(engine, PROMPTS[:2], PoolingParams())) == 2


def test_the_queue_limit_counts_tokens(tiny_checkpoint):
    engine = _engine(tiny_checkpoint, max_waiting=2, max_model_len=32)  # 64 tokens of embedding inputs
    for i in range(16):
        engine.add_request(f"short{i}", [1, 2, 3, 4], PoolingParams())  # more inputs than max_waiting
    with pytest.raises(QueueFullError):
        engine.add_request("over", [1], PoolingParams())
    engine.abort("short0")
    engine.add_request("fits", [1, 2, 3, 4], PoolingParams())
    while engine.has_unfinished():
        engine.step()
    assert engine.embedder.num_waiting_tokens == 0
