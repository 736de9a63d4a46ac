"""Falcon-Mamba (TII, "Falcon Mamba: The First Competitive Attention-free 7B Language Model", 2024): Mamba-1.

Module and parameter names equal transformers' ``FalconMambaForCausalLM`` (and ``MambaForCausalLM``), so a Hugging
Face checkpoint loads by name. Each of the N blocks is ``x + Mixer(RMSNorm(x))``; the mixer is

    u, z = in_proj(x)                    two [D] halves per token (D = intermediate_size)
    u = SiLU(causal_conv1d(u))           depthwise, kernel K, over the sequence
    Δ, B, C = x_proj(u)                  Δ of rank R, B and C of the state size N
    (Falcon-Mamba only: Δ, B, C each RMS-normalised, no weight)
    Δ = softplus(dt_proj(Δ))             [D]
    y = selective_scan(u, Δ, A = -exp(A_log), B, C) + D ⊙ u      (``selective_scan.py``)
    out_proj(y ⊙ SiLU(z))

There is no attention and no position: each sequence carries a fixed-size state per layer (the last K-1 conv
inputs and the SSM state, N x D), kept in a :class:`MambaStates` pool. One forward runs any mix of sequences,
each a run of flattened tokens that reads and writes its own slot (:class:`RecurrentBatch`): a one-token run is a
decode step (all of them in one batched update), a longer run a prefill chunk (the chunked scan).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .causal_lm import CausalLM
from .falcon import FalconLinear
from .mamba_config import FalconMambaConfig
from .norms import RMSNorm
from .recurrent import RecurrentState, causal_conv
from .selective_scan import selective_scan_chunked, selective_state_update


@dataclass
class MambaStates(RecurrentState):
    """Recurrent state for ``num_slots`` sequences, every layer: ``conv`` [L, S, K-1, D] in the model dtype and
    ``ssm`` [L, S, N, D] in float32 (the scan runs in float32; rounding it each token would drift). Channels
    last in both, so each op runs along the long D axis."""

    @classmethod
    def allocate(  # type: ignore[override]
        cls, config: FalconMambaConfig, num_slots: int, dtype: torch.dtype, device: str | torch.device = "cpu"
    ) -> MambaStates:
        layers = config.num_hidden_layers
        conv = torch.zeros(layers, num_slots, *config.conv_state_shape(), dtype=dtype, device=device)
        ssm = torch.zeros(layers, num_slots, *config.ssm_state_shape(), dtype=torch.float32, device=device)
        return cls(conv, ssm)


@dataclass
class RecurrentBatch:
    """Which state slot each run of the step's flattened tokens reads and writes.

    Run i is tokens ``query_starts[i] : query_starts[i] + query_lens[i]`` of sequence slot ``slots[i]``;
    ``fresh[i]`` says it starts at the sequence's first token (its slot is zeroed first)."""

    states: MambaStates
    slots: list[int]
    query_starts: list[int]
    query_lens: list[int]
    fresh: list[bool]
    step_rows: torch.Tensor = field(init=False)  # token rows of the one-token runs (decode steps)
    step_slots: torch.Tensor = field(init=False)  # and their slots
    runs: list[tuple[int, int, int]] = field(init=False)  # (start, length, slot) of the longer runs

    step_block: slice | None = field(init=False)  # the step slots as one slice, when they are consecutive
    steps_only: bool = field(init=False)  # every token is a decode step, token r in row r (no gathers needed)

    def __post_init__(self) -> None:
        device = self.states.conv.device
        steps = [(s, slot) for s, n, slot in zip(self.query_starts, self.query_lens, self.slots, strict=True) if n == 1]
        self.step_rows = torch.tensor([s for s, _ in steps], dtype=torch.long, device=device)
        self.step_slots = torch.tensor([slot for _, slot in steps], dtype=torch.long, device=device)
        self.runs = [
            (s, n, slot) for s, n, slot in zip(self.query_starts, self.query_lens, self.slots, strict=True) if n > 1
        ]
        step_slots = [slot for _, slot in steps]
        first = step_slots[0] if step_slots else 0
        consecutive = step_slots == list(range(first, first + len(step_slots)))
        self.step_block = slice(first, first + len(step_slots)) if steps and consecutive else None
        self.steps_only = not self.runs and [s for s, _ in steps] == list(range(len(steps)))

    def step_states(self, layer_states: torch.Tensor) -> torch.Tensor:
        """The step rows' states of one layer [R, ...]: a view when their slots are consecutive (updated in
        place), else a gathered copy (written back by :meth:`put_step_states`)."""
        if self.step_block is not None:
            return layer_states[self.step_block]
        return layer_states[self.step_slots]

    def put_step_states(self, layer_states: torch.Tensor, updated: torch.Tensor) -> None:
        """Store the step rows' updated states (nothing to do when :meth:`step_states` gave a view)."""
        if self.step_block is None:
            layer_states[self.step_slots] = updated

    @classmethod
    def dense(cls, states: MambaStates, batch_size: int, length: int, fresh: bool) -> RecurrentBatch:
        """``batch_size`` rows of ``length`` tokens each, row b in slot b."""
        rows = list(range(batch_size))
        return cls(states, rows, [b * length for b in rows], [length] * batch_size, [fresh] * batch_size)

    def reset_fresh(self) -> None:
        fresh = [slot for slot, f in zip(self.slots, self.fresh, strict=True) if f]
        if fresh:
            self.states.reset(torch.tensor(fresh, dtype=torch.long, device=self.states.conv.device))


class MambaRMSNorm(RMSNorm):
    """The block and final norm (the same RMSNorm as Llama's; named as in transformers' Mamba)."""


class FalconMambaMixer(nn.Module):
    """in_proj -> causal conv1d -> SiLU -> x_proj -> dt_proj -> selective scan (+ D skip) -> gate -> out_proj.

    The projections are :class:`FalconLinear` (an ``nn.Linear`` with the same parameters), so the engine can bind
    the native bfloat16 matmul to them as it does for Falcon."""

    def __init__(self, config: FalconMambaConfig, layer_idx: int) -> None:
        super().__init__()
        h, d, n, r, k = (
            config.hidden_size,
            config.intermediate_size,
            config.state_size,
            config.time_step_rank,
            config.conv_kernel,
        )
        self.layer_idx = layer_idx
        self.time_step_rank, self.state_size = r, n
        self.rms_eps = config.mixer_rms_eps if config.mixer_rms else None
        self.in_proj = FalconLinear(h, 2 * d, bias=config.use_bias)
        self.conv1d = nn.Conv1d(d, d, k, groups=d, padding=k - 1, bias=config.use_conv_bias)
        self.x_proj = FalconLinear(d, r + 2 * n, bias=False)
        self.dt_proj = FalconLinear(r, d, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).expand(d, n).clone())
        self.D = nn.Parameter(torch.ones(d))
        self.out_proj = FalconLinear(d, h, bias=config.use_bias)

    def forward(self, x: torch.Tensor, batch: RecurrentBatch) -> torch.Tensor:
        """``x`` [tokens, H] -> [tokens, H]; each run's state is read from and written back to its slot."""
        A_T, taps = self._constants()
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self._conv(u, taps, batch))
        dt, B, C = self._selection(u)
        y = self._scan(u, dt, A_T.T, B, C, batch)
        return self.out_proj(y * F.silu(z))

    def _constants(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A.T = -exp(A_log).T`` [N, D] in float32 and the conv taps [K, D], both contiguous: derived from the
        parameters once, not at every decode step (recomputed when a parameter is replaced or changed)."""
        A_log, weight = self.A_log, self.conv1d.weight
        key = (A_log.data_ptr(), A_log._version, weight.data_ptr(), weight._version)
        if getattr(self, "_constants_key", None) != key:
            self._A_T = (-torch.exp(A_log.detach().float())).T.contiguous()
            self._conv_taps = weight.detach()[:, 0, :].T.contiguous()
            self._constants_key = key
        return self._A_T, self._conv_taps

    def _conv(self, u: torch.Tensor, taps: torch.Tensor, batch: RecurrentBatch) -> torch.Tensor:
        """Causal depthwise conv1d over each run, prefixed by its slot's last K-1 inputs (zeros when fresh)."""
        states = batch.states.conv[self.layer_idx]  # [S, K-1, D]
        if batch.steps_only:
            return self._conv_step(u, taps, states, batch)
        out = torch.empty_like(u)
        if batch.step_rows.numel():  # decode: one window per sequence, all at once
            out[batch.step_rows] = self._conv_step(u[batch.step_rows], taps, states, batch)
        for start, n, slot in batch.runs:  # prefill chunks
            full = torch.cat([states[slot], u[start : start + n]])  # [K-1+n, D]
            out[start : start + n] = causal_conv(full, taps, self.conv1d.bias)
            states[slot] = full[full.shape[0] - states.shape[1] :]
        return out

    def _conv_step(
        self, u: torch.Tensor, taps: torch.Tensor, states: torch.Tensor, batch: RecurrentBatch
    ) -> torch.Tensor:
        """One new input per decode row ``u`` [R, D]: the window's dot product with the taps [K, D], summed as a
        prompt chunk's are (``causal_conv``); the state shifts by one."""
        past = batch.step_states(states)  # [R, K-1, D]
        window = torch.cat([past, u[:, None, :]], dim=1)  # [R, K, D]
        y = causal_conv(window, taps, self.conv1d.bias)[:, 0]
        if batch.step_block is not None:
            past.copy_(window[:, 1:])
        else:
            batch.put_step_states(states, window[:, 1:])
        return y

    def _selection(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The input-dependent Δ (after dt_proj and softplus) [tokens, D], B and C [tokens, N]."""
        projected = self.x_proj(u)
        if self.rms_eps is not None:  # Falcon-Mamba
            projected = self._segment_rms(projected)
        dt, B, C = projected.split([self.time_step_rank, self.state_size, self.state_size], dim=-1)
        return F.softplus(self.dt_proj(dt)), B, C

    def _segment_rms(self, projected: torch.Tensor) -> torch.Tensor:
        """:func:`rms` of Δ, B and C, each its own segment of ``projected`` [tokens, R + 2N], in a few ops for
        all three: the squares' segment means come out of one matmul."""
        sizes = (self.time_step_rank, self.state_size, self.state_size)
        key = (projected.device, sizes)
        if getattr(self, "_segments_key", None) != key:
            which = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))  # built on the CPU, then moved
            means = torch.zeros(sum(sizes), 3)
            means[torch.arange(sum(sizes)), which] = 1.0 / torch.tensor(sizes, dtype=torch.float32)[which]
            self._segment_means, self._segment_of = means.to(projected.device), which.to(projected.device)
            self._segments_key = key
        x32 = projected.float()
        scale = torch.rsqrt((x32 * x32) @ self._segment_means + self.rms_eps)  # [tokens, 3]
        return (x32 * scale[:, self._segment_of]).to(projected.dtype)

    def _scan(
        self,
        u: torch.Tensor,
        dt: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        batch: RecurrentBatch,
    ) -> torch.Tensor:
        states = batch.states.ssm[self.layer_idx]  # [S, N, D]
        if batch.steps_only:
            return self._scan_step(u, dt, A, B, C, states, batch)
        y = torch.empty_like(u)
        rows = batch.step_rows
        if rows.numel():
            y[rows] = self._scan_step(u[rows], dt[rows], A, B[rows], C[rows], states, batch)
        for start, n, slot in batch.runs:
            part = slice(start, start + n)
            y[part], states[slot] = selective_scan_chunked(u[part], dt[part], A, B[part], C[part], self.D, states[slot])
        return y

    def _scan_step(
        self,
        u: torch.Tensor,
        dt: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        states: torch.Tensor,
        batch: RecurrentBatch,
    ) -> torch.Tensor:
        """The decode rows' single-step recurrence, their states updated in place where they are a view."""
        h = batch.step_states(states)
        y = selective_state_update(h, u, dt, A, B, C, self.D)
        batch.put_step_states(states, h)
        return y


class FalconMambaBlock(nn.Module):
    """``x + Mixer(RMSNorm(x))``, the residual in float32 when ``residual_in_fp32``."""

    def __init__(self, config: FalconMambaConfig, layer_idx: int) -> None:
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = MambaRMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mixer = FalconMambaMixer(config, layer_idx)

    def forward(self, x: torch.Tensor, batch: RecurrentBatch) -> torch.Tensor:
        residual = x.float() if self.residual_in_fp32 else x
        return residual + self.mixer(self.norm(x.to(self.norm.weight.dtype)), batch)


class FalconMambaModel(nn.Module):
    """Embedding, the blocks, the final RMSNorm."""

    def __init__(self, config: FalconMambaConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(FalconMambaBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm_f = MambaRMSNorm(config.hidden_size, config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, batch: RecurrentBatch) -> torch.Tensor:
        """Hidden states [B, T, H] after ``norm_f``, in the model dtype; ``batch`` maps the B*T flattened tokens
        to state slots."""
        shape = input_ids.shape
        x = self.embeddings(input_ids.reshape(-1))  # [tokens, H]
        batch.reset_fresh()
        for block in self.layers:
            x = block(x, batch)
        return self.norm_f(x).to(self.norm_f.weight.dtype).view(*shape, -1)


class FalconMambaForCausalLM(CausalLM):
    """Falcon-Mamba with its language-model head (tied to the embedding unless ``tie_word_embeddings`` is false)."""

    decoder_name, embeddings_name, final_norm_name = "backbone", "embeddings", "norm_f"
    family_label = "Falcon-Mamba"

    def __init__(self, config: FalconMambaConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = FalconMambaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def new_states(self, num_slots: int) -> MambaStates:
        """Zeroed recurrent state for ``num_slots`` sequences, in the model's dtype and device."""
        return MambaStates.allocate(self.config, num_slots, self.dtype, self.device)

    def forward(
        self, input_ids: torch.Tensor, states: MambaStates | None = None, last_token_only: bool = False
    ) -> torch.Tensor:
        """The HF-style call: logits [B, T, vocab] for ``input_ids`` [B, T] (no padding).

        Without ``states`` each row starts fresh; with them (one slot per row, from :meth:`new_states`) each row
        continues from its slot, which then holds the state after these T tokens."""
        b, t = input_ids.shape
        fresh = states is None
        states = self.new_states(b) if states is None else states
        hidden = self.forward_hidden(input_ids, None, RecurrentBatch.dense(states, b, t, fresh))
        return self._logits(hidden, last_token_only)

    def forward_hidden(
        self, input_ids: torch.Tensor, positions: torch.Tensor | None, batch: RecurrentBatch
    ) -> torch.Tensor:
        """Hidden states [B, T, H] after ``norm_f`` (``positions`` are not used: Mamba has none)."""
        return self.backbone(input_ids, batch)

    def _init_own(self, module: nn.Module) -> None:
        """The mixer's A and D as at construction (S4D-real A = -[1..N] per channel, D = 1)."""
        if isinstance(module, FalconMambaMixer):
            n = module.state_size
            module.A_log.data.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).expand_as(module.A_log))
            module.D.data.fill_(1.0)
