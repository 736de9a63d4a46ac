"""The Mamba-2 state-space scan (SSD, Dao & Gu 2024, "Transformers are SSMs"), three ways that agree.

Per head h (P channels, state size N; heads share B and C within a group), with Δ already through softplus::

    state_t = exp(Δ_t · A_h) · state_{t-1} + Δ_t · x_t ⊗ B_t        state: [P, N]
    y_t     = state_t · C_t + D_h · x_t

* :func:`ssd_reference`: the recurrence as written, one time step after another (the test oracle);
* :func:`ssd_chunked`: the SSD chunked form for prefill: inside a chunk of L steps the recurrence is a masked,
  attention-like quadratic form; between chunks only the state is carried (one small update per chunk);
* :func:`ssd_step`: one new token per sequence for decode, updating the state in place.

Shapes: x [b, T, H, P], dt [b, T, H], A [H] (negative), B and C [b, T, G, N], D [H], state [b, H, P, N]. All
arithmetic is in float32; outputs are float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """B or C [..., G, N] -> [..., H, N]: head h reads group h // (H / G)."""
    return t.float().repeat_interleave(num_heads // t.shape[-2], dim=-2)


def ssd_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y [b, T, H, P] and the final state [b, H, P, N], one step at a time from ``state`` (zeros if None)."""
    b, T, H, P = x.shape
    B, C = _heads(B, H), _heads(C, H)
    x, dt = x.float(), dt.float()
    h = x.new_zeros(b, H, P, B.shape[-1]) if state is None else state.float().clone()
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, t] * A.float())  # [b, H]
        h = h * decay[:, :, None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append((h * C[:, t, :, None, :]).sum(-1) + D.float()[:, None] * x[:, t])
    return torch.stack(ys, dim=1), h


def ssd_step(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    state: torch.Tensor,
) -> torch.Tensor:
    """One token per sequence: x [b, H, P], dt [b, H], B and C [b, G, N]; ``state`` [b, H, P, N] (float32) is
    updated in place. Returns y [b, H, P]."""
    H = x.shape[1]
    B, C = _heads(B, H), _heads(C, H)
    x, dt = x.float(), dt.float()
    decay = torch.exp(dt * A.float())  # [b, H]
    state.mul_(decay[:, :, None, None]).addcmul_((dt[:, :, None] * x)[..., None], B[:, :, None, :])
    b, _, P, N = state.shape
    # y = state · C as a row vector times each [N, P] matrix: many times faster on CPU than [P, N] by a column
    y = torch.bmm(C.reshape(b * H, 1, N), state.reshape(b * H, P, N).transpose(1, 2)).view(b, H, P)
    return y.addcmul_(D.float()[:, None], x)


def segment_sums(a: torch.Tensor) -> torch.Tensor:
    """[..., L] -> [..., L, L]: entry (i, j) is a_{j+1} + ... + a_i for j <= i, -inf above the diagonal.

    Summed directly over the masked range rather than as a difference of two cumulative sums, which would lose
    precision once the sums grow large."""
    L = a.shape[-1]
    below = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device), diagonal=-1)
    sums = a[..., :, None].expand(*a.shape, L).masked_fill(~below, 0).cumsum(dim=-2)  # [.., k, j] = a_k, k > j
    diagonal_and_below = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device))
    return sums.masked_fill(~diagonal_and_below, float("-inf"))


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    chunk_size: int,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y [b, T, H, P] and the final state [b, H, P, N] by chunks of ``chunk_size`` steps (see module docstring).

    The sequence is padded to whole chunks with Δ = 0: a padded step neither decays nor feeds the state, so the
    final state is exact.
    """
    b, T, H, P = x.shape
    L = chunk_size
    pad = (-T) % L
    B, C = _heads(B, H), _heads(C, H)
    xf, dtf = x.float(), dt.float()
    xdt = F.pad(xf * dtf[..., None], (0, 0, 0, 0, 0, pad))  # Δ_t x_t, the input that feeds the state
    a = F.pad(dtf * A.float(), (0, 0, 0, pad))  # Δ_t A: the log of each step's decay
    B, C = F.pad(B, (0, 0, 0, 0, 0, pad)), F.pad(C, (0, 0, 0, 0, 0, pad))
    n = (T + pad) // L
    xdt, B, C = (t.reshape(b, n, L, H, -1) for t in (xdt, B, C))  # [b, n, L, H, P or N]
    a = a.reshape(b, n, L, H).permute(0, 3, 1, 2)  # [b, H, n, L]
    a_cum = a.cumsum(dim=-1)

    # 1. Inside each chunk: y_i = sum_{j <= i} (C_i . B_j) exp(a_{j+1} + ... + a_i) Δ_j x_j.
    decay_within = torch.exp(segment_sums(a))  # [b, H, n, L, L]
    scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * decay_within
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)

    # 2. Each chunk's own contribution to the state at its end.
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # [b, H, n, L]
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, xdt)

    # 3. Between chunks: carry the state across, one update per chunk.
    h = x.new_zeros(b, H, P, B.shape[-1], dtype=torch.float32) if state is None else state.float()
    chunk_decay = torch.exp(a_cum[..., -1])  # [b, H, n]
    entering = []
    for c in range(n):
        entering.append(h)
        h = h * chunk_decay[:, :, c, None, None] + chunk_states[:, c]
    states_in = torch.stack(entering, dim=1)  # [b, n, H, P, N]: the state before each chunk

    # 4. What the carried state adds inside each chunk, decayed to each position.
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states_in, torch.exp(a_cum))
    y = y.reshape(b, n * L, H, P)[:, :T]
    return y + D.float()[:, None] * xf, h
