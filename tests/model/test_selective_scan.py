"""The three selective scans agree: the sequential reference, the chunked associative scan, the decode step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from falconlm.model.selective_scan import selective_scan_chunked, selective_scan_reference, selective_state_update

D_CH, N = 12, 5


def _inputs(length: int, seed: int, big_dt: bool = False):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(length, D_CH, generator=g)
    dt = F.softplus(torch.randn(length, D_CH, generator=g) * (4.0 if big_dt else 1.0))
    A = -torch.exp(torch.randn(D_CH, N, generator=g))
    B, C = torch.randn(length, N, generator=g), torch.randn(length, N, generator=g)
    D = torch.randn(D_CH, generator=g)
    return u, dt, A, B, C, D


@pytest.mark.parametrize("length", [1, 7, 32, 33, 100])
@pytest.mark.parametrize("chunk_size", [1, 8, 32])
@pytest.mark.parametrize("parallel", [True, False])
def test_chunked_equals_reference(length, chunk_size, parallel):
    u, dt, A, B, C, D = _inputs(length, seed=length)
    state = torch.randn(N, D_CH)
    y_ref, h_ref = selective_scan_reference(u, dt, A, B, C, D, state)
    y, h = selective_scan_chunked(u, dt, A, B, C, D, state, chunk_size=chunk_size, parallel=parallel)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("parallel", [True, False])
def test_large_steps_do_not_overflow(parallel):
    u, dt, A, B, C, D = _inputs(64, seed=1, big_dt=True)
    y_ref, h_ref = selective_scan_reference(u, dt, A, B, C, D)
    y, h = selective_scan_chunked(u, dt, A, B, C, D, parallel=parallel)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)


def test_decode_steps_equal_reference_for_several_sequences():
    seqs = [_inputs(9, seed=s) for s in range(3)]
    A, D = seqs[0][2], seqs[0][5]
    state = torch.zeros(3, N, D_CH)
    ys = []
    for t in range(9):
        u = torch.stack([s[0][t] for s in seqs])
        dt = torch.stack([s[1][t] for s in seqs])
        B = torch.stack([s[3][t] for s in seqs])
        C = torch.stack([s[4][t] for s in seqs])
        ys.append(selective_state_update(state, u, dt, A, B, C, D))
    for i, (u, dt, _, B, C, _) in enumerate(seqs):
        y_ref, h_ref = selective_scan_reference(u, dt, A, B, C, D)
        torch.testing.assert_close(torch.stack([y[i] for y in ys]), y_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state[i], h_ref, atol=1e-5, rtol=1e-5)


def test_split_prefill_carries_the_state():
    u, dt, A, B, C, D = _inputs(40, seed=5)
    y_all, h_all = selective_scan_reference(u, dt, A, B, C, D)
    y1, h1 = selective_scan_chunked(u[:17], dt[:17], A, B[:17], C[:17], D)
    y2, h2 = selective_scan_chunked(u[17:], dt[17:], A, B[17:], C[17:], D, h1)
    torch.testing.assert_close(torch.cat([y1, y2]), y_all, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h2, h_all, atol=1e-5, rtol=1e-5)
