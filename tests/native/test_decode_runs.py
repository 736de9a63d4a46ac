"""Decode runs on a real model (engine.py, runner.py, decode_run.py, csrc/decode_run.cpp): an engine that runs up to 16
model steps per schedule gives every request the same tokens, logprobs, text and finish as one that runs one step per
schedule, for bfloat16, int8 and int4 weights, Falcon-7B's block, falcon-rw's and Falcon3's, in every native variant
this CPU runs; greedy batches take the one-call native run and others the step-by-step one, and both stop where a
request ends."""

from __future__ import annotations

from pathlib import Path

import pytest

import falconlm.engine.engine as engine_module
from falconlm.engine.engine import Engine, EngineConfig
from falconlm.engine.fused_decode import FusedDecoder
from falconlm.engine.sampling_params import SamplingParams
from falconlm.quant.linear import QuantizedEmbedding
from falconlm.tokenizer import Tokenizer

from ..conftest import make_hf_checkpoint, needs_native
from ..model.falcon3_checkpoint import make_falcon3_checkpoint
from .fused_calls import model_in

pytestmark = needs_native

PROMPTS = [[5, 9, 77], list(range(10, 19)), list(range(40, 54))]  # 3, 9 and 14 tokens over blocks of 4


@pytest.fixture(scope="module", params=["7b", "rw", "falcon3"])
def checkpoint(request, tmp_path_factory) -> Path:
    # Weights larger than the default initialisation: greedy tokens then vary from step to step rather than
    # repeating one token, so a step that went wrong inside a run shows in them. rw: falcon-rw's block, whose runs
    # read ALiBi's bias up to their last position.
    shapes = {
        "7b": {"hidden_size": 128, "initializer_range": 0.3},
        "rw": {"hidden_size": 192, "num_attention_heads": 6, "initializer_range": 0.2, "seed": 1},
    }
    folder = tmp_path_factory.mktemp(f"runs-{request.param}")
    if request.param == "falcon3":  # RMSNorm as the final norm, an untied head
        return make_falcon3_checkpoint(folder, "gqa", num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    return make_hf_checkpoint(folder, request.param, **shapes[request.param])


@pytest.fixture(autouse=True)
def long_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs as long as num_scheduler_steps allows, however slow the machine's steps."""
    monkeypatch.setattr(engine_module, "DECODE_RUN_SECONDS", 1e3)


def _generate(
    model, checkpoint: Path, params: list[SamplingParams], steps: int, monkeypatch
) -> tuple[list, Engine, list]:
    """Each request's (tokens, text, finish reason, logprobs) from an engine of ``steps`` scheduler steps, the
    engine, and how many tokens each native run call gave (None: it declined)."""
    runs: list[int | None] = []
    run = FusedDecoder.run

    def counted(self, *args, **kwargs):
        out = run(self, *args, **kwargs)
        runs.append(None if out is None else len(out))
        return out

    monkeypatch.setattr(FusedDecoder, "run", counted)
    config = EngineConfig(
        block_size=4, max_num_batched_tokens=64, enable_prefix_caching=False, num_scheduler_steps=steps
    )
    engine = Engine(model, Tokenizer.from_pretrained(checkpoint), config)
    outs = engine.generate(PROMPTS, params)
    got = [
        (
            o.token_ids,
            o.text,
            o.finish_reason,
            None if o.logprobs is None else [(lp.token_id, lp.logprob, lp.top) for lp in o.logprobs],
        )
        for o in outs
    ]
    assert engine.kv_cache_manager.num_free_blocks == engine.runner.cache.num_blocks
    return got, engine, runs


@pytest.mark.parametrize("weights", ["bf16", "int8", "int4"])
def test_greedy_runs_go_native_and_give_every_token_of_single_steps(
    isa: str, checkpoint: Path, weights: str, monkeypatch
) -> None:
    model = model_in(checkpoint, weights)
    plain = SamplingParams(max_tokens=21, temperature=0.0, ignore_eos=True)
    single, single_engine, _ = _generate(model, checkpoint, [plain] * 3, 1, monkeypatch)
    tokens = single[1][0]
    assert len(set(tokens)) > 5, tokens
    # a token the second request first chooses inside its first run (runs start at its third token): it must end
    # there, the others go on
    first = next(i for i in range(3, len(tokens)) if tokens[i] not in tokens[:i])
    stop = tokens[first]
    params = [plain, SamplingParams(max_tokens=21, temperature=0.0, stop_token_ids=[stop]), plain]
    single, single_engine, _ = _generate(model, checkpoint, params, 1, monkeypatch)
    runs, run_engine, calls = _generate(model, checkpoint, params, 16, monkeypatch)
    assert runs == single
    assert single[1][2] == "stop" and len(single[1][0]) == first + 1
    assert run_engine.num_steps < single_engine.num_steps
    if untied_quantized_embedding(model):  # not one the library reads: every run goes step by step in Python
        assert calls == []
        return
    # whole runs in one native call each: 16 steps, or the 15 left after a run that a stop token ended early
    assert calls and None not in calls and max(calls) >= 15


def untied_quantized_embedding(model) -> bool:
    """Whether ``model``'s embedding is quantized in its own stored format (an untied head's, as Falcon3's)."""
    embedding = model.get_input_embeddings()
    return isinstance(embedding, QuantizedEmbedding) and embedding.head_kernel is None


@pytest.mark.parametrize("weights", ["bf16", "int4"])
def test_sampled_and_logprob_rows_run_step_by_step_with_the_same_results(
    isa: str, checkpoint: Path, weights: str, monkeypatch
) -> None:
    model = model_in(checkpoint, weights)
    params = [
        SamplingParams(max_tokens=20, temperature=0.8, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.0, logprobs=3, ignore_eos=True),
        SamplingParams(max_tokens=17, temperature=0.9, top_k=20, seed=11, ignore_eos=True, stop=["a"]),
    ]
    single, single_engine, _ = _generate(model, checkpoint, params, 1, monkeypatch)
    runs, run_engine, calls = _generate(model, checkpoint, params, 16, monkeypatch)
    assert runs == single
    assert calls == []  # the rows are not all greedy: no native run; Python ran the steps
    assert run_engine.num_steps < single_engine.num_steps


@pytest.mark.parametrize("reason", ["head", "rows"])
def test_a_run_the_library_cannot_take_is_declined_before_its_rows_are_described(
    isa: str, checkpoint: Path, monkeypatch, reason: str
) -> None:
    """A model whose embedding or head the library does not read (``run_parts`` None), or more rows than one native
    call takes (MAX_CALL_ROWS, here 2): greedy runs go step by step in Python with the same tokens, and each step
    describes its rows once, none for the declined native runs."""
    import falconlm.engine.fused_decode as fused_module
    from falconlm.engine.runner import ModelRunner

    model = model_in(checkpoint, "int4")
    params = [SamplingParams(max_tokens=21, temperature=0.0, ignore_eos=True)] * 3
    single, single_engine, _ = _generate(model, checkpoint, params, 1, monkeypatch)
    if reason == "head":
        monkeypatch.setattr(fused_module, "run_parts", lambda model: None)
    else:  # single steps of 3 rows then go in native calls of 2 rows and 1, the same bits
        monkeypatch.setattr(fused_module, "MAX_CALL_ROWS", 2)
    described = []
    describe = ModelRunner._describe

    def counted(self, rows, *args, **kwargs):
        described.append(len(rows))
        return describe(self, rows, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "_describe", counted)
    runs, run_engine, calls = _generate(model, checkpoint, params, 16, monkeypatch)
    assert runs == single
    assert calls == []  # declined before FusedDecoder.run was called
    assert run_engine.num_steps < single_engine.num_steps
    assert len(described) == single_engine.num_steps  # one description per model step, as one step per schedule
