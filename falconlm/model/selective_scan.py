"""The Mamba-1 selective scan (Gu & Dao, 2023, Algorithm 2), three ways that agree.

For one sequence of L tokens with D channels and an N-wide state per channel:

    h_t = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t u_t) ⊗ B_t        h: [D, N]
    y_t = h_t · C_t + D_skip ⊙ u_t                      y: [D]

with ``A = -exp(A_log)`` [D, N], ``Δ`` [L, D] (after softplus), ``B``, ``C`` [L, N] and ``u`` [L, D].

* :func:`selective_scan_reference`: the recurrence above, a token at a time; the test oracle.
* :func:`selective_scan_chunked`: prefill. Chunks of ``chunk_size`` tokens; inside a chunk the linear
  recurrence ``h_t = a_t h_{t-1} + b_t`` is an associative scan over (a, b) pairs, done in log2(chunk) doubling
  steps (Hillis-Steele), so each step is one batched op over the chunk; the state carries from chunk to chunk.
  Decays are products of numbers in (0, 1], so nothing overflows, whatever Δ is.
* :func:`selective_state_update`: decode, one token for each of R sequences at once, state updated in place.

All math is float32; ``y`` comes back in ``u``'s dtype and the state in its own.
"""

from __future__ import annotations

import torch


def selective_scan_reference(
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y`` [L, D] and the final state [D, N] for one sequence, starting from ``state`` (zeros if None)."""
    h = _start(state, A)
    ys = []
    for t in range(u.shape[0]):
        dt_t = dt[t].float()[:, None]  # [D, 1]
        h = torch.exp(dt_t * A) * h + dt_t * B[t].float()[None, :] * u[t].float()[:, None]
        ys.append(h @ C[t].float())
    y = torch.stack(ys) + u.float() * D.float()
    return y.to(u.dtype), h.to(_state_dtype(state))


def selective_scan_chunked(
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    state: torch.Tensor | None = None,
    chunk_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same result as :func:`selective_scan_reference`, a chunk of tokens per batched op (see module doc)."""
    h = _start(state, A)
    ys = []
    for start in range(0, u.shape[0], chunk_size):
        end = min(start + chunk_size, u.shape[0])
        dt_c = dt[start:end].float()[:, :, None]  # [T, D, 1]
        a = torch.exp(dt_c * A)  # [T, D, N] decay of each step
        b = dt_c * B[start:end].float()[:, None, :] * u[start:end].float()[:, :, None]  # [T, D, N] input
        b[0] += a[0] * h  # the carried state enters through the first step
        hs = _linear_scan(a, b)  # [T, D, N]: h_t for every t of the chunk
        ys.append(torch.einsum("tdn,tn->td", hs, C[start:end].float()))
        h = hs[-1]
    y = torch.cat(ys) + u.float() * D.float()
    return y.to(u.dtype), h.to(_state_dtype(state))


def selective_state_update(
    state: torch.Tensor,
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
) -> torch.Tensor:
    """One token for each of R sequences: ``state`` [R, D, N] advanced in place; returns ``y`` [R, D].

    ``u``, ``dt`` [R, D]; ``B``, ``C`` [R, N]."""
    dt_r = dt.float()[:, :, None]  # [R, D, 1]
    h = torch.exp(dt_r * A) * state.float() + dt_r * B.float()[:, None, :] * u.float()[:, :, None]
    state.copy_(h)
    y = torch.einsum("rdn,rn->rd", h, C.float()) + u.float() * D.float()
    return y.to(u.dtype)


def _linear_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All prefixes of ``h_t = a_t h_{t-1} + b_t`` (h_{-1} = 0) along dim 0, by recursive doubling.

    After the step with offset k, position t holds the composition of steps t-2k+1..t; pairs compose as
    (a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2)."""
    a, b = a.clone(), b.clone()
    k = 1
    while k < a.shape[0]:
        b[k:] = a[k:] * b[:-k] + b[k:]
        a[k:] = a[k:] * a[:-k]
        k *= 2
    return b


def _start(state: torch.Tensor | None, A: torch.Tensor) -> torch.Tensor:
    return torch.zeros(A.shape, dtype=torch.float32, device=A.device) if state is None else state.float()


def _state_dtype(state: torch.Tensor | None) -> torch.dtype:
    return torch.float32 if state is None else state.dtype
