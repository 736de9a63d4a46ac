"""Tensor-parallel Falcon-Mamba and Falcon-H1 on 2 and 3 gloo ranks give the logits of one process.

Every case runs a prompt (the chunked scans from a fresh state), one decode token per row (the single-step
recurrences, the state carried from the prompt) and a second chunk continuing from that state (Mamba also one
engine-style step mixing a decode and a fresh prompt), on tiny float32 checkpoints written by transformers; two
of them also run greedy requests through the engine on every rank. All cases of one world size share one spawned
world.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from falconlm.model.falcon_h1 import FalconH1ForCausalLM
from falconlm.model.falcon_mamba import FalconMambaForCausalLM, RecurrentBatch
from falconlm.parallel import ParallelState

from ..model.h1_checkpoints import save_hf_h1
from ..model.mamba_checkpoints import save_hf_mamba
from ..oracle import uncached_greedy
from .world import run_world

VOCAB = 97
BATCH = 2

# Falcon-H1 shapes: three ratios of attention to SSM heads, B/C groups fewer than / as many as / more than the
# ranks, the gated norm before and after the gate (and off), every bias on in one, multipliers away from 1.
H1_CASES: dict[str, dict[str, Any]] = {
    # 4 attention heads / 2 KV, 4 SSM heads in 1 group: the group (and its norm) spans the ranks
    "h1-one-group": {"mamba_n_groups": 1},
    # 6 / 3 KV heads of 8, 8 SSM heads of 8 in 2 groups, norm after the gate, tied head
    "h1-two-groups": {
        "num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 8, "mamba_n_heads": 8, "mamba_d_ssm": 64,
        "mamba_n_groups": 2, "mamba_norm_before_gate": False, "tie_word_embeddings": True,
        "ssm_in_multiplier": 1.3, "attention_in_multiplier": 0.6, "attention_out_multiplier": 1.4,
    },
    # 8 attention heads on 1 KV head, 8 SSM heads in 4 groups, no gated norm, every bias
    # 2 SSM heads of 32 in 1 group: one head per rank on 2 ranks, refused on 3
    "h1-two-ssm-heads": {"mamba_n_heads": 2, "mamba_n_groups": 1},
    "h1-four-groups-biases": {
        "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 8, "mamba_n_heads": 8, "mamba_d_ssm": 64,
        "mamba_n_groups": 4, "mamba_rms_norm": False, "attention_bias": True, "mlp_bias": True,
        "projectors_bias": True, "mamba_proj_bias": True, "intermediate_size": 80,
    },
}  # fmt: skip

MAMBA_CASES: dict[str, dict[str, Any]] = {
    "falcon-mamba": {"falcon": True},  # B, C and Δ RMS-normalised
    "mamba-biases": {"falcon": False, "use_bias": True, "tie_word_embeddings": False},
}


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "prompt": torch.randint(0, VOCAB, (BATCH, 11), generator=g),  # more than one H1 scan chunk (8)
        "step": torch.randint(0, VOCAB, (BATCH, 1), generator=g),
        "chunk": torch.randint(0, VOCAB, (BATCH, 3), generator=g),
    }


def _mamba_logits(model: FalconMambaForCausalLM) -> list[torch.Tensor]:
    x = _inputs()
    states = model.new_states(BATCH)
    out = []
    with torch.no_grad():
        for key in ("prompt", "step", "chunk"):  # the first call starts each slot fresh (zeroed state)
            out.append(model(x[key], states))
        # the engine's mixed step: slot 0 decodes one token while slot 1 restarts with a fresh 4-token prompt
        ids = torch.cat([x["step"][0], x["prompt"][1, :4]])[None]
        batch = RecurrentBatch(states, [0, 1], [0, 1], [1, 4], [False, True])
        out.append(model.compute_logits(model.forward_hidden(ids, None, batch)))
    return out


def _h1_logits(model: FalconH1ForCausalLM) -> list[torch.Tensor]:
    x = _inputs()
    cache = model.new_cache(BATCH, 32)
    with torch.no_grad():
        return [model(x[key], cache=cache) for key in ("prompt", "step", "chunk")]


def _logits(model) -> list[torch.Tensor]:
    return _mamba_logits(model) if isinstance(model, FalconMambaForCausalLM) else _h1_logits(model)


def _ranks_logits(state: ParallelState, folders: dict[str, str]) -> dict[str, Any]:
    from falconlm.parallel.loading import load_sharded

    torch.manual_seed(0)
    out: dict[str, Any] = {}
    for name, folder in folders.items():
        try:
            model = load_sharded(folder, state, torch.float32)
        except ValueError as exc:  # every rank refuses alike, before any collective: no rank waits on another
            out[name] = str(exc)
            continue
        out[name] = _logits(model)
        if name in ENGINE_CASES:
            out[name + ":engine"] = _engine_tokens(model)
    return out


ENGINE_CASES = ("falcon-mamba", "h1-two-groups")
ENGINE_PROMPTS = [list(range(1, 14)), [5, 6], list(range(20, 41)), [9, 9, 9]]
ENGINE_STEPS = 6


def _engine_tokens(model) -> list[list[int]]:
    """Greedy tokens through the engine (paged KV, state slots, chunked prefill, batched decode). Every rank runs
    its own engine: the scheduling is deterministic, so all of them make the same forwards in the same order. The
    pools are sized alike on every rank (num_blocks; slots = max_num_seqs), whatever each rank's state size."""
    from falconlm.engine.engine import Engine, EngineConfig
    from falconlm.engine.sampling_params import SamplingParams
    from falconlm.tokenizer import NoTokenizer

    config = EngineConfig(max_num_seqs=4, max_model_len=64, max_num_batched_tokens=16, num_blocks=32,
                          block_size=8, kv_cache_memory=1 << 30)  # fmt: skip
    engine = Engine(model, NoTokenizer(None, "the test has none"), config)
    params = SamplingParams(max_tokens=ENGINE_STEPS, temperature=0.0, ignore_eos=True)
    return [out.token_ids for out in engine.generate(ENGINE_PROMPTS, [params] * len(ENGINE_PROMPTS))]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp-recurrent")
    folders = {}
    for name, settings in MAMBA_CASES.items():
        settings = dict(settings)
        folders[name] = root / name
        save_hf_mamba(folders[name], settings.pop("falcon"), seed=3, vocab_size=VOCAB, **settings)
    for name, overrides in H1_CASES.items():
        folders[name] = save_hf_h1(root / name, vocab_size=VOCAB, **overrides)
    return folders


@pytest.fixture(scope="module")
def reference(checkpoints) -> dict[str, list[torch.Tensor]]:
    """One process's logits, the unsharded model."""
    out = {}
    for name, folder in checkpoints.items():
        cls = FalconMambaForCausalLM if name in MAMBA_CASES else FalconH1ForCausalLM
        model = cls.from_pretrained(folder).eval()
        out[name] = _logits(model)
        if name in ENGINE_CASES:
            out[name + ":engine"] = [uncached_greedy(model, p, ENGINE_STEPS) for p in ENGINE_PROMPTS]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_logits_equal_one_process(world: int, checkpoints, reference) -> None:
    folders = {name: str(path) for name, path in checkpoints.items()}
    ranks = run_world(_ranks_logits, world, folders, timeout=240)
    for name, want in reference.items():
        if name.endswith(":engine"):
            assert [r[name] for r in ranks] == [want] * world, name
            continue
        if name == "h1-two-ssm-heads" and world == 3:
            for result in ranks:
                assert "mamba_n_heads (2) must be at least the tensor-parallel size (3)" in result[name]
            continue
        for rank, result in enumerate(ranks):
            for step, (got, exp) in enumerate(zip(result[name], want, strict=True)):
                torch.testing.assert_close(
                    got, exp, atol=1e-5, rtol=1e-5, msg=lambda m, n=name, r=rank, s=step: f"{n} rank {r} call {s}: {m}"
                )


QUANT_CASES = {"int8": "int8", "int4-g32": "int4-g32"}  # quantized on load; plus one folder stored as int4 g32 sym


def _quantized_logits(state: ParallelState, folders: dict[str, tuple[str, str | None]]) -> dict[str, Any]:
    from falconlm.parallel.loading import load_sharded

    out: dict[str, Any] = {}
    for name, (folder, spec) in folders.items():
        model = load_sharded(folder, state, torch.float32, quantize=spec)
        with torch.no_grad():
            out[name] = model(_inputs()["prompt"])
    return out


@pytest.mark.slow
def test_quantized_shards_equal_one_process(tmp_path: Path, checkpoints, monkeypatch: pytest.MonkeyPatch) -> None:
    """int8 / int4 on load and a stored int4 folder, on 2 ranks: the one-process quantized model's logits (both
    sides on one kernel: a rank's narrower matrices could otherwise pick another one)."""
    from falconlm.model.formats import load_pretrained
    from falconlm.quant import QuantRecipe, quantize_checkpoint

    monkeypatch.setenv("FALCONLM_QUANT_KERNEL", "reference")
    folders: dict[str, tuple[str, str | None]] = {}
    for name in ("falcon-mamba", "h1-one-group"):
        for label, spec in QUANT_CASES.items():
            folders[f"{name}-{label}"] = (str(checkpoints[name]), spec)
        stored = tmp_path / f"{name}-int4-stored"
        quantize_checkpoint(checkpoints[name], stored, QuantRecipe.parse("int4-g32-sym"), progress=False)
        folders[f"{name}-int4-stored"] = (str(stored), None)
    ranks = run_world(_quantized_logits, 2, folders, timeout=240)
    for name, (folder, spec) in folders.items():
        with torch.no_grad():
            want = load_pretrained(Path(folder), torch.float32, "cpu", spec)(_inputs()["prompt"])
        for rank, result in enumerate(ranks):
            torch.testing.assert_close(
                result[name], want, atol=2e-5, rtol=1e-5, msg=lambda m, n=name, r=rank: f"{n} rank {r}: {m}"
            )
