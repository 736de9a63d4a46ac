"""HybridRunner: the ModelRunner for models with attention and Mamba layers side by side (Falcon-H1).

The attention half is the ModelRunner's own: paged KV blocks, slots and block tables per request. The Mamba
half reads and writes each request's recurrent-state slot (``Request.state_slot``, held from admission with its
KV blocks, ``state_pool.HybridCacheManager``): one :class:`~falconlm.model.recurrent.RecurrentBatch` per forward
says where each request's tokens sit in the step and which slot they continue. A run starting at token 0 (a new
request, or one recomputed after preemption) starts from a zero state; decode rows are updated together by the
single-step recurrence, prompt chunks by the chunked scan; in deterministic mode prompt tokens take the
single-step recurrence too (``RecurrentBatch.stepwise``), since the chunked scan's sums depend on where a chunk
starts. The native fused decode step takes Falcon's and Falcon3's attention-only blocks, so these models take the torch
path.
"""

from __future__ import annotations

import torch

from ..model.paged_attention import PagedAttention
from ..model.recurrent import RecurrentBatch
from .forward_batch import ForwardBatch
from .recurrent_runner import describe_state_row
from .runner import ModelRunner, rows_of
from .scheduler_output import ScheduledRequest


class HybridRunner(ModelRunner):
    """A ModelRunner that also owns ``num_slots`` recurrent states of every Mamba layer."""

    DECODE_RUNS = False  # one model step per schedule: decode runs are tested on attention-only models

    def __init__(self, model, num_blocks: int, block_size: int, num_slots: int, deterministic: bool = False) -> None:
        super().__init__(model, num_blocks, block_size, deterministic)
        self.num_slots = num_slots
        self.states = model.new_recurrent_state(num_slots)

    def _describe_row(self, batch: ForwardBatch, item: ScheduledRequest) -> None:
        super()._describe_row(batch, item)  # positions, KV slots and block table for the attention half
        describe_state_row(batch, item)  # and the Mamba half's state slot

    def _hidden(
        self,
        batch: ForwardBatch,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        ctx: PagedAttention,
        rope_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rows = RecurrentBatch(
            self.states, batch.state_slots, ctx.query_starts, ctx.query_lens, batch.fresh, stepwise=self.deterministic
        )
        return rows_of(self.model.forward_hidden(input_ids, position_ids, ctx, rows), batch.logits_rows)
