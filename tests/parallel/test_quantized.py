"""Quantized Falcon and Falcon3 split over ranks: a folder written by ``falconlm quantize`` and quantize-on-load
give the one-process quantized model's logits; a split that the int4 groups forbid is a ValueError naming the
layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from falconlm.model.falcon import FalconForCausalLM
from falconlm.parallel import ParallelState
from falconlm.parallel.loading import load_sharded
from falconlm.quant import QuantRecipe, quantize_checkpoint

from .models import logits, write_falcon, write_falcon3
from .world import run_world

# Multi-query (one KV group shared by every rank, its 8 query heads split) with biases, and grouped-query
# with 4 groups and an untied head: head_dim 16, so int4 g32 puts a boundary every 2 heads, g64 every 4.
SHAPES = {
    "mqa": {"hidden_size": 128, "num_attention_heads": 8, "multi_query": True, "bias": True},
    "gqa": {
        "hidden_size": 128, "num_attention_heads": 8, "new_decoder_architecture": True, "num_kv_heads": 4,
        "tie_word_embeddings": False,
    },
}  # fmt: skip
RECIPES = {"int8": "int8", "int4-g32": "int4-g32", "int4-g64": "int4-g64-sym"}
# Falcon3: grouped-query with 2 KV groups (shared by ranks on 3), untied head.
FALCON3 = {
    "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 8, "num_key_value_heads": 2,
    "head_dim": 16, "tie_word_embeddings": False,
}  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str | None]]:
    """name -> (folder, quantize-on-load spec or None for a stored quantized folder)."""
    root = tmp_path_factory.mktemp("tp-quant")
    out = {}
    for shape, overrides in SHAPES.items():
        plain = write_falcon(root / shape, "custom", seed=1, **overrides)
        for name, spec in RECIPES.items():
            stored = root / f"{shape}-{name}"
            quantize_checkpoint(plain, stored, QuantRecipe.parse(spec), progress=False)
            out[f"{shape}-{name}-stored"] = (str(stored), None)
            out[f"{shape}-{name}-on-load"] = (str(plain), spec)
    plain = write_falcon3(root / "falcon3", "custom", seed=3, **FALCON3)
    for name in ("int8", "int4-g32"):
        stored = root / f"falcon3-{name}"
        quantize_checkpoint(plain, stored, QuantRecipe.parse(RECIPES[name]), progress=False)
        out[f"falcon3-{name}-stored"] = (str(stored), None)
        out[f"falcon3-{name}-on-load"] = (str(plain), RECIPES[name])
    return out


def _quantized_logits(state: ParallelState, folders: dict[str, tuple[str, str | None]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, (path, spec) in folders.items():
        try:
            out[name] = logits(load_sharded(path, state, torch.float32, quantize=spec))
        except ValueError as exc:
            out[name] = str(exc)
    return out


# With the reference kernel a rank's logits differ from one process's only by the order its partial sums are
# added in (the row-parallel all-reduce). The native kernels also round each activation to int8, and a difference
# that small can move one activation across a rounding step (seen on an AVX2 CPU: 1e-6 in layer 0's output became
# 5e-3 in layer 1's, 9e-4 in the logits). So they get a bound far below the logits' spread (about 0.7), which any
# misplaced slice would move them by, and the reference kernel checks the slicing to float rounding.
REFERENCE_ATOL = 2e-5
NATIVE_ATOL = 1e-2


@pytest.mark.slow
@pytest.mark.parametrize(("world", "kernel"), [(2, "reference"), (2, "auto"), (3, "reference")])
def test_quantized_shards_equal_one_process(
    world: int, kernel: str, folders: dict[str, tuple[str, str | None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # On 2 ranks every share fits the native kernels, which "auto" then runs on both sides. Shares of 3 (171 MLP
    # features, 34 vocabulary rows) fit neither the native tiles nor torch's int8 pack, so there only one kernel
    # pinned on both sides compares like with like (the ranks inherit the environment).
    monkeypatch.setenv("FALCONLM_QUANT_KERNEL", kernel)
    atol = REFERENCE_ATOL if kernel == "reference" else NATIVE_ATOL
    ranks = run_world(_quantized_logits, world, folders, timeout=300)
    for name, (path, spec) in folders.items():
        if world == 3 and "g64" in name:  # 8 heads on g64 boundaries (every 4 heads) make 2 pieces for 3 ranks
            for got in ranks:
                assert isinstance(got[name], str) and "self_attention.dense" in got[name], got[name]
            continue
        want = logits(FalconForCausalLM.from_pretrained(path, quantize=spec))
        for rank, got in enumerate(ranks):
            assert isinstance(got[name], torch.Tensor), f"{name} rank {rank}: {got[name]}"
            torch.testing.assert_close(got[name], want, rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def test_recipe_mismatch_is_refused(tmp_path: Path) -> None:
    from falconlm.parallel.state import ParallelState as State

    plain = write_falcon(tmp_path / "plain", "7b")
    quantize_checkpoint(plain, tmp_path / "q", QuantRecipe.parse("int8"), progress=False)
    fake_rank = State(0, 2, torch.device("cpu"))  # refused before any collective
    with pytest.raises(ValueError, match="already quantized"):
        load_sharded(tmp_path / "q", fake_rank, quantize="int4")
