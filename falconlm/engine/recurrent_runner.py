"""RecurrentRunner: the ModelRunner for attention-free (Mamba) models, over a pool of recurrent-state slots.

Each scheduled request is a run of tokens that reads and writes its state slot (``Request.state_slot``, held from
admission, see ``state_pool.py``); a run that starts at token 0 (a new request, or one recomputed after
preemption) starts from a zeroed state. Decode rows of a step go through one batched state update, prompt chunks
through the chunked scan, in the same forward (``model.falcon_mamba.RecurrentBatch``). Sampling, prompt logprobs
and the per-request generators are the ModelRunner's. The native fused decode step is Falcon-only: these models run
the torch path, with the native bfloat16 matmul bound to their projections and head on CPU (``kernels.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..model.falcon_mamba import FalconMambaForCausalLM, RecurrentBatch
from .forward_batch import ForwardBatch
from .fused_decode import FusedDecoder
from .kernels import bind_weight_kernels
from .prompt_logprobs import PromptRows, prompt_rows
from .request import Request
from .runner import ModelRunner
from .sampler import Sampler
from .scheduler_output import ScheduledRequest


class RecurrentRunner(ModelRunner):
    """One Mamba model, its ``num_slots`` recurrent states, the sampler and the per-request generators."""

    def __init__(
        self, model: FalconMambaForCausalLM, num_slots: int, deterministic: bool = False
    ) -> None:  # no super(): no KV cache
        self.model = model
        self.device = model.device
        self.deterministic = False  # rows are already independent here: each runs its own scan
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

    def _describe(self, items: list[ScheduledRequest]) -> tuple[ForwardBatch, list[Request], list[PromptRows]]:
        batch = ForwardBatch()
        sampled = []
        for item in items:
            req, start, n = item.request, item.start, item.num_tokens
            if req.state_slot is None:
                raise RuntimeError(f"request {req.request_id!r} was scheduled without a state slot")
            batch.state_slots.append(req.state_slot)
            batch.query_starts.append(batch.num_tokens)
            batch.query_lens.append(n)
            batch.fresh.append(start == 0)
            batch.token_ids.extend(req.all_token_ids[start : start + n])
            if item.sample:
                sampled.append(req)
                batch.logits_rows.append(batch.num_tokens - 1)
        if not batch.num_tokens:
            return batch, [], []
        scored = prompt_rows(items, batch.query_starts)
        batch.logits_rows += [i for part in scored for i in part.flat_indices]
        return batch, sampled, scored

    def run_batch(self, batch: ForwardBatch, decoder: FusedDecoder | None = None) -> torch.Tensor | None:
        rows = RecurrentBatch(self.states, batch.state_slots, batch.query_starts, batch.query_lens, batch.fresh)
        hidden = self.model.forward_hidden(torch.tensor([batch.token_ids], device=self.device), None, rows)
        logits_rows = torch.tensor(batch.logits_rows, dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden, logits_rows) if batch.logits_rows else None
