"""The recurrent-state seam: where a Mamba layer's fixed-size per-sequence state lives during a forward.

Attention layers keep a KV cache that grows with the sequence (``attention.py``); a Mamba layer keeps, per
sequence, the last ``d_conv - 1`` inputs of its causal convolution and its SSM state, whatever the length. Both
live in *slots* of a :class:`RecurrentState`; a :class:`RecurrentBatch` says, for one forward, which slot each
row reads and writes and where the row's new tokens sit in the forward's flattened [B * T] token order. The same
shape serves the HF-style call (row r = batch row r, slot r) and the engine's flattened steps (row r = one
request's new tokens, slot = the request's slot in the engine's pool).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass
class RecurrentState:
    """Conv and SSM state of every Mamba layer, one slot per sequence.

    ``conv`` [layers, slots, d_conv - 1, conv channels] in the activations' dtype (channels last: a decode step's
    ops run along the long channel axis, not the 3-wide window); ``ssm`` [layers, slots,
    *per-layer state shape*] (Mamba-2: heads, head dim, state size), float32 by default: it is summed over the
    whole sequence, so it keeps full precision even for a bfloat16 model.
    """

    conv: torch.Tensor
    ssm: torch.Tensor

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        num_slots: int,
        conv_channels: int,
        conv_width: int,
        ssm_shape: tuple[int, ...],
        conv_dtype: torch.dtype,
        device: torch.device | str = "cpu",
        ssm_dtype: torch.dtype = torch.float32,
    ) -> RecurrentState:
        conv = torch.zeros(num_layers, num_slots, conv_width - 1, conv_channels, dtype=conv_dtype, device=device)
        ssm = torch.zeros(num_layers, num_slots, *ssm_shape, dtype=ssm_dtype, device=device)
        return cls(conv, ssm)

    @property
    def num_slots(self) -> int:
        return self.conv.shape[1]

    def reset(self, slots: torch.Tensor) -> None:
        """Zero the state of ``slots`` in every layer (a sequence starting from its first token)."""
        self.conv[:, slots] = 0
        self.ssm[:, slots] = 0

    def bytes_per_slot(self) -> int:
        return (self.conv[:, 0].numel() * self.conv.element_size()) + self.ssm[:, 0].numel() * self.ssm.element_size()


@dataclass
class RecurrentBatch:
    """One forward's rows: row r's ``query_lens[r]`` new tokens start at ``query_starts[r]`` of the flattened
    tokens and continue the sequence held in slot ``slots[r]``, unless ``fresh[r]`` (the row's first tokens: the
    slot's old content is ignored and overwritten). ``token_mask`` [B * T] (1 real, 0 left padding) zeroes
    padding before and after the convolution, as transformers does, so a left-padded row equals its unpadded
    self. ``stepwise`` (the engine's deterministic mode) sends prompt tokens through the one-token update too, a
    position at a time, where a model's chunked scan would sum differently depending on where a chunk starts."""

    state: RecurrentState
    slots: list[int]
    query_starts: list[int]
    query_lens: list[int]
    fresh: list[bool]
    token_mask: torch.Tensor | None = None
    stepwise: bool = False

    @cached_property
    def step_rows(self) -> list[int]:
        """Rows adding one token to an existing state: updated together by the single-step recurrence."""
        return [r for r, n in enumerate(self.query_lens) if n == 1 and not self.fresh[r]]

    @cached_property
    def scan_rows(self) -> list[int]:
        """Rows with a prompt or a prompt chunk (or a first token): each scanned by chunks."""
        step = set(self.step_rows)
        return [r for r, n in enumerate(self.query_lens) if n > 0 and r not in step]

    @cached_property
    def step_slots(self) -> torch.Tensor:
        return torch.tensor([self.slots[r] for r in self.step_rows], dtype=torch.long, device=self.state.conv.device)

    @cached_property
    def step_block(self) -> slice | None:
        """The step rows' slots as one slice when they are consecutive (their states are then a view, updated in
        place), else None."""
        slots = [self.slots[r] for r in self.step_rows]
        if not slots or slots != list(range(slots[0], slots[0] + len(slots))):
            return None
        return slice(slots[0], slots[0] + len(slots))

    @cached_property
    def steps_only(self) -> bool:
        """Every row is a step row and its token sits at its row index: the step needs no gathers."""
        return len(self.step_rows) == len(self.query_lens) and self.query_starts == list(range(len(self.query_lens)))

    def step_states(self, layer_states: torch.Tensor) -> torch.Tensor:
        """The step rows' states of one layer: a view when :attr:`step_block` is set, else a gathered copy."""
        return layer_states[self.step_block] if self.step_block is not None else layer_states[self.step_slots]

    def put_step_states(self, layer_states: torch.Tensor, updated: torch.Tensor) -> None:
        """Store the step rows' updated states unless ``updated`` is the view itself."""
        if self.step_block is None or updated.data_ptr() != layer_states[self.step_block].data_ptr():
            layer_states[self.step_slots] = updated

    @cached_property
    def step_positions(self) -> torch.Tensor:
        """Where the step rows' tokens sit in the flattened forward."""
        return torch.tensor(
            [self.query_starts[r] for r in self.step_rows], dtype=torch.long, device=self.state.conv.device
        )

    @classmethod
    def dense(
        cls, state: RecurrentState, batch_size: int, length: int, fresh: bool, token_mask: torch.Tensor | None = None
    ) -> RecurrentBatch:
        """The HF-style call: row r is batch row r (slot r), all rows ``length`` tokens long."""
        rows = range(batch_size)
        return cls(
            state, list(rows), [r * length for r in rows], [length] * batch_size, [fresh] * batch_size, token_mask
        )


def causal_conv(seq: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The causal depthwise convolution of ``seq`` [..., K - 1 + n, C] (the K - 1 inputs before the run, then its
    n new ones) with ``taps`` [K, C]: [..., n, C] in ``seq``'s dtype.

    Summed in float32 one tap after another, the same multiply-adds for every output, so a decode step (n = 1)
    and a prompt chunk give a token the same bits however the prompt was cut into chunks (``F.conv1d``'s sums,
    and a bfloat16 window product, differ)."""
    K, n = taps.shape[0], seq.shape[-2] - taps.shape[0] + 1
    seq32, taps = seq.float(), taps.float()
    out = seq32[..., 0:n, :] * taps[0]
    for k in range(1, K):
        out.addcmul_(seq32[..., k : k + n, :], taps[k])
    if bias is not None:
        out += bias.float()
    return out.to(seq.dtype)
