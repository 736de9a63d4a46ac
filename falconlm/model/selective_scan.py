"""The Mamba-1 selective scan (Gu & Dao, 2023, Algorithm 2), three ways that agree.

For one sequence of L tokens with D channels and an N-wide state per channel:

    h_t = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t u_t) ⊗ B_t
    y_t = C_t · h_t + D_skip ⊙ u_t                      y: [D]

with ``A = -exp(A_log)`` [D, N] (the parameter's layout), ``Δ`` [L, D] (after softplus), ``B``, ``C`` [L, N] and
``u`` [L, D]. The state is kept as ``h`` [N, D], channels last, so that every elementwise op runs along the long
channel axis (an op whose innermost axis is N = 16 wide runs many times slower on CPU).

* :func:`selective_scan_reference`: the recurrence above, a token at a time; the test oracle.
* :func:`selective_scan_chunked`: prefill. Chunks of ``chunk_size`` tokens; a chunk's discretisation (the decays
  ``a_t = exp(Δ_t A)``, the inputs ``b_t = Δ_t u_t B_t``) and its output contraction with C are each one batched
  op, and the linear recurrence ``h_t = a_t h_{t-1} + b_t`` in between runs one of two ways. ``parallel``: an
  associative scan over (a, b) pairs in log2(chunk) doubling steps (Hillis-Steele), each one op over the whole
  chunk, for GPUs; decays are products of numbers in (0, 1], so nothing overflows, whatever Δ is. Otherwise (the
  default on CPU, where the doubling steps' extra memory traffic costs more than they save): one fused
  multiply-add per token into the chunk's buffer. The state carries from chunk to chunk.
* :func:`selective_state_update`: decode, one token for each of R sequences at once, state updated in place.

All math is float32; ``y`` comes back in ``u``'s dtype and the state in its own. The fast scans floor the decays'
exponents at ``LOG_DECAY_FLOOR``: below it exp(Δ A) is under 2e-35, nothing next to the state's other terms, and
the exact value would be a subnormal float, which CPUs compute tens of times slower (a random or long-idle
channel's large Δ hits this on every token).
"""

from __future__ import annotations

import torch

LOG_DECAY_FLOOR = -80.0


def selective_scan_reference(
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y`` [L, D] and the final state [N, D] for one sequence, starting from ``state`` (zeros if None)."""
    h = _start(state, A)
    At = A.float().T  # [N, D]
    ys = []
    for t in range(u.shape[0]):
        dt_t = dt[t].float()  # [D]
        h = torch.exp(dt_t * At) * h + B[t].float()[:, None] * (dt_t * u[t].float())
        ys.append(C[t].float() @ h)
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
    parallel: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same result as :func:`selective_scan_reference`, a chunk of tokens per batched op (see module doc).

    ``parallel`` None picks the associative scan off the CPU and the in-order recurrence on it."""
    if parallel is None:
        parallel = u.device.type != "cpu"
    scan = _linear_scan if parallel else _linear_recurrence
    h = _start(state, A)
    At = A.float().T  # [N, D]
    ys = []
    for start in range(0, u.shape[0], chunk_size):
        part = slice(start, min(start + chunk_size, u.shape[0]))
        a, b = _decays_and_inputs(u[part], dt[part], At, B[part])  # [T, N, D] each
        b[0].addcmul_(a[0], h)  # the carried state enters through the first step
        hs = scan(a, b)  # [T, N, D]: h_t for every t of the chunk
        ys.append(_read_out(C[part], hs))  # [T, D]
        h = hs[-1]
    y = torch.cat(ys).addcmul_(u.float(), D.float())
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
    """One token for each of R sequences: ``state`` [R, N, D] advanced in place; returns ``y`` [R, D].

    ``u``, ``dt`` [R, D]; ``B``, ``C`` [R, N]. The same ops, on the same per-token shapes, as a token of
    :func:`selective_scan_chunked` on the CPU: a token gets the same bits as a decode step as inside a prompt
    chunk, so a prompt's result does not depend on where it was cut into chunks."""
    a, b = _decays_and_inputs(u, dt, A.float().T, B)  # [R, N, D] each
    h = b.addcmul_(a, state.float())
    state.copy_(h)
    return _read_out(C, h).addcmul_(u.float(), D.float()).to(u.dtype)


def _decays_and_inputs(
    u: torch.Tensor, dt: torch.Tensor, At: torch.Tensor, B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's decay ``a = exp(Δ A)`` and input ``b = (Δ u) ⊗ B``, [T, N, D] each, from ``u``, ``dt`` [T, D],
    ``At`` [N, D] and ``B`` [T, N]; the exponent floored at ``LOG_DECAY_FLOOR``."""
    dt32 = dt.float()
    a = torch.exp((dt32[:, None, :] * At).clamp_min_(LOG_DECAY_FLOOR))
    b = B.float()[:, :, None] * (dt32 * u.float())[:, None, :]
    return a, b


def _read_out(C: torch.Tensor, hs: torch.Tensor) -> torch.Tensor:
    """``y_t = C_t · h_t`` [T, D] for ``C`` [T, N] and the states ``hs`` [T, N, D]."""
    return torch.bmm(C.float()[:, None, :], hs)[:, 0]


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


def _linear_recurrence(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The same prefixes in order, one fused multiply-add per step, written over ``b``."""
    for t in range(1, a.shape[0]):
        b[t].addcmul_(a[t], b[t - 1])
    return b


def _start(state: torch.Tensor | None, A: torch.Tensor) -> torch.Tensor:
    n_d = (A.shape[1], A.shape[0])
    return torch.zeros(n_d, dtype=torch.float32, device=A.device) if state is None else state.float()


def _state_dtype(state: torch.Tensor | None) -> torch.dtype:
    return torch.float32 if state is None else state.dtype
