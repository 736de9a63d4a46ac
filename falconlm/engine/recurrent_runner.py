"""RecurrentRunner: the ModelRunner for attention-free (Mamba) models, over a pool of recurrent-state slots.

Each scheduled request is a run of tokens that reads and writes its state slot (``Request.state_slot``, held from
admission, see ``state_pool.py``); a run that starts at token 0 (a new request, or one recomputed after
preemption) starts from a zeroed state. Decode rows of a step go through one batched state update, prompt chunks
through the chunked scan, in the same forward (``model.falcon_mamba.RecurrentBatch``). Sampling, prompt logprobs
and the per-request generators are the ModelRunner's. The native fused decode step is Falcon-only: these models run
the torch path, with the native bfloat16 matmul bound to their projections and head on CPU (``kernels.py``).
"""

from __future__ import annotations

import torch

from ..model.falcon_mamba import FalconMambaForCausalLM, RecurrentBatch
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
        self.states = model.new_states(num_slots)
        self.sampler = Sampler()
        self.req_id_to_generator: dict[str, torch.Generator | None] = {}
        if self.device.type == "cpu":
            bind_weight_kernels(model, invariant=deterministic)

    def _fused_decoder(self) -> FusedDecoder | None:
        return None

    def _forward(
        self, items: list[ScheduledRequest], decoder: FusedDecoder | None
    ) -> tuple[list[Request], torch.Tensor | None, list[PromptRows]]:
        ids: list[int] = []
        slots, query_starts, query_lens, fresh = [], [], [], []
        sampled, logits_indices = [], []
        for item in items:
            req, start, n = item.request, item.start, item.num_tokens
            if req.state_slot is None:
                raise RuntimeError(f"request {req.request_id!r} was scheduled without a state slot")
            slots.append(req.state_slot)
            query_starts.append(len(ids))
            query_lens.append(n)
            fresh.append(start == 0)
            ids.extend(req.all_token_ids[start : start + n])
            if item.sample:
                sampled.append(req)
                logits_indices.append(len(ids) - 1)
        if not ids:
            return [], None, []
        scored = prompt_rows(items, query_starts)
        logits_indices += [i for part in scored for i in part.flat_indices]
        batch = RecurrentBatch(self.states, slots, query_starts, query_lens, fresh)
        hidden = self.model.forward_hidden(torch.tensor([ids], device=self.device), None, batch)
        rows = torch.tensor(logits_indices, dtype=torch.long, device=self.device)
        return sampled, self.model.compute_logits(hidden, rows) if logits_indices else None, scored
