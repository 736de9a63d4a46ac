"""RecurrentRunner: the ModelRunner for attention-free (Mamba) models, over a pool of recurrent-state slots.

Each scheduled request is a run of tokens that reads and writes its state slot (``Request.state_slot``, held from
admission, see ``state_pool.py``); a run that starts at token 0 (a new request, or one recomputed after
preemption) starts from a zeroed state. Decode rows of a step go through one batched state update, prompt chunks
through the chunked scan, in the same forward (``model.falcon_mamba.RecurrentBatch``). Sampling, prompt logprobs
and the per-request generators are the ModelRunner's. The native fused decode step takes attention-only blocks:
these models run the torch path, with the native bfloat16 matmul bound to their projections and head on CPU
(``kernels.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..model.falcon_mamba import FalconMambaForCausalLM, RecurrentBatch
from .forward_batch import ForwardBatch
from .fused_decode import FusedDecoder
from .kernels import bind_weight_kernels
from .runner import ModelRunner, rows_of
from .sampler import Sampler
from .scheduler_output import ScheduledRequest


def describe_state_row(batch: ForwardBatch, item: ScheduledRequest) -> None:
    """A row's recurrent-state slot, and whether its state starts fresh (its first chunk) or continues."""
    if item.request.state_slot is None:
        raise RuntimeError(f"request {item.request.request_id!r} was scheduled without a state slot")
    batch.state_slots.append(item.request.state_slot)
    batch.fresh.append(item.start == 0)


class RecurrentRunner(ModelRunner):
    """One Mamba model, its ``num_slots`` recurrent states, the sampler and the per-request generators."""

    DECODE_RUNS = False  # one model step per schedule: decode runs are tested on attention-only models

    def __init__(
        self, model: FalconMambaForCausalLM, num_slots: int, deterministic: bool = False
    ) -> None:  # no super(): no KV cache
        self.model = model
        self.device = model.device
        # Rows are independent here (each runs its own scan), and a token gets the same bits as a decode step as
        # inside a prompt chunk (``selective_scan.py``, ``recurrent.causal_conv``), so deterministic mode needs no
        # separate forwards for decode rows and prompt chunks: only the invariant matmuls bound below.
        self.deterministic = False
        self.num_slots = num_slots
        self.fused_allowed = False
        self.on_forward: Callable[[ForwardBatch], None] | None = None  # sees each forward first (tp_runner.py)
        self.states = model.new_states(num_slots)
        self.sampler = Sampler()
        self.req_id_to_generator: dict[str, torch.Generator | None] = {}
        if self.device.type == "cpu":
            bind_weight_kernels(model, invariant=deterministic)

    def _fused_decoder(self) -> FusedDecoder | None:
        return None

    def _describe_row(self, batch: ForwardBatch, item: ScheduledRequest) -> None:
        describe_state_row(batch, item)  # no positions or KV: a Mamba row is its tokens and its state

    def logits_states(
        self, batch: ForwardBatch, decoder: FusedDecoder | None = None, prompt_chunks: bool = False
    ) -> torch.Tensor | None:
        rows = RecurrentBatch(self.states, batch.state_slots, batch.query_starts, batch.query_lens, batch.fresh)
        hidden = self.model.forward_hidden(torch.tensor([batch.token_ids], device=self.device), None, rows)
        return rows_of(hidden, batch.logits_rows)
