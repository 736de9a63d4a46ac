"""Falcon and Falcon3 split over 2 and 3 gloo ranks give the one-process logits (fp32, within 1e-5), through
the dense HF-style call with a KV cache and through the engine's paged attention."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from falconlm import native
from falconlm.engine.kernels import bind_weight_kernels
from falconlm.model.falcon import FalconForCausalLM, FalconLinear
from falconlm.parallel import ParallelState
from falconlm.parallel.loading import load_sharded

from .models import FALCON, FALCON3, logits, paged_logits, write_falcon, write_falcon3
from .world import run_world

BFLOAT16 = ("falcon-40b", "falcon3-gqa")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp-models")
    paths = {f"falcon-{v}": write_falcon(root / f"falcon-{v}", v) for v in FALCON}
    paths |= {f"falcon3-{v}": write_falcon3(root / f"falcon3-{v}", v) for v in FALCON3}
    return paths


def _sharded_logits(state: ParallelState, paths: dict[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for name, path in paths.items():
        model = load_sharded(path, state, torch.float32)
        out[name] = logits(model)
        out[f"{name}/paged"] = paged_logits(model)
        out[f"{name}/heads"] = torch.tensor(model.config.num_attention_heads)
    for name in BFLOAT16:  # the engine's native bfloat16 matmul, bound inside the parallel layers
        model = load_sharded(paths[name], state, torch.bfloat16)
        linears = sum(isinstance(m, FalconLinear) for m in model.modules())
        out[f"{name}/bound"] = torch.tensor([linears, bind_weight_kernels(model)])
        out[f"{name}/bf16"] = logits(model)
    return out


def _bf16_logits(path: Path) -> torch.Tensor:
    model = FalconForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    bind_weight_kernels(model)
    return logits(model)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_logits_equal_one_process(world: int, checkpoints: dict[str, Path]) -> None:
    expected, heads = {}, {}
    for name, path in checkpoints.items():
        model = FalconForCausalLM.from_pretrained(path)
        expected |= {name: logits(model), f"{name}/paged": paged_logits(model)}
        heads[name] = model.config.num_attention_heads
    ranks = run_world(_sharded_logits, world, {k: str(v) for k, v in checkpoints.items()}, timeout=240)
    for name, want in expected.items():
        for rank, got in enumerate(ranks):
            torch.testing.assert_close(
                got[name], want, rtol=0, atol=1e-5, msg=lambda m, n=name, r=rank: f"{n} rank {r}: {m}"
            )
    for name, total in heads.items():  # the heads are split, not copied
        assert sum(int(r[f"{name}/heads"]) for r in ranks) == total, name
    for name in BFLOAT16:  # bfloat16 partial sums round differently: within bfloat16's precision of the logits
        want = _bf16_logits(checkpoints[name])
        for got in ranks:
            linears, bound = got[f"{name}/bound"].tolist()
            assert bound == (linears if native.kernels() is not None else 0) and linears > 0, name
            assert (got[f"{name}/bf16"] - want).abs().max() <= 0.05 * want.abs().max(), name
