"""Weights moved into transparent huge pages: same values, same parameter objects, no doubled memory."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from falconlm.engine import huge_pages
from falconlm.engine.huge_pages import HUGE_PAGE, huge_page_copy, move_to_huge_pages

needs_madvise = pytest.mark.skipif(
    huge_pages.thp_mode() != "madvise",
    reason=f"transparent huge pages are {huge_pages.thp_mode()!r} here, not 'madvise': nothing is moved",
)


def _anon_huge_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_thp_mode_reads_the_bracketed_choice(tmp_path, monkeypatch) -> None:
    mode = tmp_path / "enabled"
    mode.write_text("always [madvise] never\n")
    monkeypatch.setattr(huge_pages, "THP_MODE", mode)
    assert huge_pages.thp_mode() == "madvise"
    mode.write_text("[always] madvise never\n")
    assert huge_pages.thp_mode() == "always" and not huge_pages.wanted()
    monkeypatch.setattr(huge_pages, "THP_MODE", tmp_path / "missing")
    assert huge_pages.thp_mode() is None and not huge_pages.wanted()


@needs_madvise
def test_a_copy_is_equal_aligned_and_backed_by_huge_pages() -> None:
    t = torch.randn(3, 1 << 20)  # 12 MiB
    before = _anon_huge_kib()
    copy = huge_page_copy(t)
    assert torch.equal(copy, t) and copy.dtype == t.dtype and copy.shape == t.shape
    assert copy.data_ptr() % HUGE_PAGE == 0
    assert _anon_huge_kib() - before >= 8 << 10  # at least 8 of the 12 MiB in 2 MiB pages
    copy.add_(1)  # writable, and its own memory
    assert torch.equal(copy, t + 1)


@needs_madvise
def test_the_model_keeps_its_parameters_ties_and_values(monkeypatch) -> None:
    embed = torch.nn.Embedding(4096, 512)
    head = torch.nn.Linear(512, 4096, bias=False)
    head.weight = embed.weight  # tied, as Falcon's head
    model = torch.nn.ModuleDict({"embed": embed, "head": head, "small": torch.nn.Linear(8, 8)})
    model.head.register_buffer("codes", torch.randint(0, 255, (4096, 1024), dtype=torch.uint8))
    model.small.register_buffer("codes", model.head.codes)  # one buffer held by two modules
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    weight, small_weight = embed.weight, model.small.weight
    old_pointer = weight.data_ptr()

    moved = move_to_huge_pages(model)

    assert moved == 4096 * 512 * 4 + 4096 * 1024  # the tied weight once, the shared buffer once
    assert model.embed.weight is weight and model.head.weight is weight and weight.data_ptr() != old_pointer
    assert weight.data_ptr() % HUGE_PAGE == 0 and model.head.codes.data_ptr() % HUGE_PAGE == 0
    assert model.small.codes is model.head.codes
    assert model.small.weight is small_weight and small_weight.data_ptr() % HUGE_PAGE != 0  # too small to move
    assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items())


def test_switched_off_nothing_moves(monkeypatch) -> None:
    monkeypatch.setenv("FALCONLM_HUGE_PAGES", "0")
    model = torch.nn.Linear(1024, 4096)
    pointer = model.weight.data_ptr()
    assert move_to_huge_pages(model) == 0 and model.weight.data_ptr() == pointer


@needs_madvise
def test_moving_does_not_double_the_peak_memory() -> None:
    script = textwrap.dedent(
        """
        import torch
        from falconlm.engine.huge_pages import move_to_huge_pages
        def kib(field):
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))
        model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048, bias=False) for _ in range(48)])  # 768 MiB
        loaded = kib("VmRSS:")
        move_to_huge_pages(model)
        print(loaded, kib("VmHWM:"), kib("VmRSS:"))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    loaded, peak, after = map(int, done.stdout.split())
    weights = 48 * 2048 * 2048 * 4 >> 10
    assert peak - loaded < 0.25 * weights  # the originals' pages go back while copying, not at the end
    assert after < loaded + 0.1 * weights
