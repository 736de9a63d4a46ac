"""A rank that leaves makes the others fail with an error, not hang."""

from __future__ import annotations

from pathlib import Path

import pytest

from falconlm.parallel import ParallelState

from .models import write_falcon
from .world import run_world


def _alone(state: ParallelState, path: str) -> str:
    from falconlm.parallel.loading import load_sharded

    from .models import logits

    if state.rank == 1:
        return "left"  # leaves the group before the first collective
    model = load_sharded(path, state)  # reading runs no collective
    try:
        logits(model)
    except RuntimeError as exc:
        return f"error: {exc}"
    return "no error"


@pytest.mark.slow
def test_a_rank_that_leaves_fails_the_others(tmp_path: Path) -> None:
    folder = write_falcon(tmp_path / "7b", "7b")
    first, second = run_world(_alone, 2, str(folder), timeout=150)  # the group's own timeout is 60 s
    assert second == "left"
    assert first.startswith("error: "), first
