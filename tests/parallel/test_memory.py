"""Each rank reads only its slices: loading a ~200 MB float32 checkpoint on 2 ranks, each rank's resident memory
grows by well under the full model's size (about half of it plus the read buffer)."""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path

import pytest
import torch

from falconlm.parallel import ParallelState

from .models import write_falcon
from .world import run_world

# Multi-query Falcon, head_dim 64: about 50 M parameters, 200 MB in float32, almost all of it in the blocks.
BIG = {
    "vocab_size": 4096, "hidden_size": 512, "num_attention_heads": 8, "multi_query": True,
    "num_hidden_layers": 18,
}  # fmt: skip


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Start VmHWM (this address space's peak) again from the current RSS; harmless where not allowed.
    (``ru_maxrss`` would not do: Linux carries it over from the process that forked the rank.)"""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _load_growth(state: ParallelState, path: str) -> dict[str, int]:
    from falconlm.parallel.loading import load_sharded

    gc.collect()
    before = _status_kib("VmRSS")
    _reset_peak()
    model = load_sharded(path, state, torch.float32)
    peak = _status_kib("VmHWM")  # the peak since the reset (or since the rank started: an upper bound)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"growth": (peak - before) * 1024, "held": held}


@pytest.mark.slow
def test_rank_memory_is_about_its_share(tmp_path: Path) -> None:
    folder = write_falcon(tmp_path / "big", "custom", seed=2, **BIG)
    full = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert full > 150e6
    for rank, got in enumerate(run_world(_load_growth, 2, str(folder), timeout=300)):
        assert got["held"] < 0.55 * full, f"rank {rank} holds {got['held']} of {full} bytes"
        assert got["growth"] < 0.7 * full, f"rank {rank} grew by {got['growth']} bytes loading {full}"
        print(f"rank {rank}: resident memory grew by {got['growth'] / full:.2f} of the weights")
