"""The Mamba-2 SSD scan three ways: the sequential reference, the chunked prefill form and the decode step agree
in float32, with and without a starting state, for lengths shorter than, equal to and past a chunk."""

from __future__ import annotations

import pytest
import torch

from falconlm.model.ssd_scan import segment_sums, ssd_chunked, ssd_reference, ssd_step


def _inputs(b: int, T: int, H: int, P: int, G: int, N: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, H, P, generator=gen)
    dt = torch.rand(b, T, H, generator=gen) * 0.8 + 0.01  # after softplus: positive
    A = -(torch.rand(H, generator=gen) * 3 + 0.1)
    B = torch.randn(b, T, G, N, generator=gen)
    C = torch.randn(b, T, G, N, generator=gen)
    D = torch.randn(H, generator=gen)
    return x, dt, A, B, C, D


@pytest.mark.parametrize("T,chunk", [(1, 4), (3, 4), (8, 4), (13, 4), (29, 8), (40, 64)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_reference(T: int, chunk: int, with_state: bool) -> None:
    b, H, P, G, N = 2, 4, 3, 2, 5
    x, dt, A, B, C, D = _inputs(b, T, H, P, G, N)
    state = torch.randn(b, H, P, N) if with_state else None
    y_ref, h_ref = ssd_reference(x, dt, A, B, C, D, state)
    y, h = ssd_chunked(x, dt, A, B, C, D, chunk, state)
    assert y.shape == (b, T, H, P) and h.shape == (b, H, P, N)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_steps_equal_reference(groups: int) -> None:
    b, T, H, P, N = 3, 11, 4, 2, 6
    x, dt, A, B, C, D = _inputs(b, T, H, P, groups, N, seed=1)
    start = torch.randn(b, H, P, N)
    y_ref, h_ref = ssd_reference(x, dt, A, B, C, D, start)
    state = start.clone()
    ys = [ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], D, state) for t in range(T)]
    torch.testing.assert_close(torch.stack(ys, dim=1), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, h_ref, atol=1e-5, rtol=1e-5)


def test_prefill_then_steps_equal_one_scan() -> None:
    """A prompt scanned by chunks, then decode steps from its final state: the same as scanning it all."""
    b, T, H, P, G, N = 1, 20, 2, 4, 1, 3
    x, dt, A, B, C, D = _inputs(b, T, H, P, G, N, seed=2)
    y_all, _ = ssd_reference(x, dt, A, B, C, D)
    y_prompt, state = ssd_chunked(x[:, :15], dt[:, :15], A, B[:, :15], C[:, :15], D, 4)
    steps = [ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], D, state) for t in range(15, T)]
    torch.testing.assert_close(torch.cat([y_prompt, torch.stack(steps, 1)], 1), y_all, atol=1e-5, rtol=1e-5)


def test_groups_share_b_and_c_by_consecutive_heads() -> None:
    """Head h reads group h // (H / G): giving each head its own copy of its group's B and C changes nothing."""
    b, T, H, P, G, N = 1, 6, 4, 2, 2, 3
    x, dt, A, B, C, D = _inputs(b, T, H, P, G, N, seed=3)
    y_grouped, _ = ssd_reference(x, dt, A, B, C, D)
    y_per_head, _ = ssd_reference(x, dt, A, B.repeat_interleave(2, 2), C.repeat_interleave(2, 2), D)
    torch.testing.assert_close(y_grouped, y_per_head)


def test_segment_sums() -> None:
    a = torch.tensor([1.0, 2.0, 4.0])
    expected = torch.tensor([[0.0, -torch.inf, -torch.inf], [2.0, 0.0, -torch.inf], [6.0, 4.0, 0.0]])
    torch.testing.assert_close(segment_sums(a), expected)
