"""ModelRunner: owns the paged KV cache tensors; turns a SchedulerOutput into one forward pass and new tokens.

It makes no decisions (the scheduler did): it flattens the step's tokens, computes each token's slot and
position, runs the model with a :class:`PagedAttention` context, and samples for the rows that reached the
end of their known tokens.
"""

from __future__ import annotations

import torch

from .. import native
from ..model.falcon import FalconForCausalLM
from ..model.paged_attention import PagedAttention, PagedKVCache
from ..model.positions import alibi_slopes
from .sampler import Sampler, make_generator
from .scheduler import ModelRunnerOutput, SchedulerOutput


class ModelRunner:
    """One model, its paged KV cache, the sampler and the per-request random generators."""

    def __init__(self, model: FalconForCausalLM, num_blocks: int, block_size: int) -> None:
        cfg = model.config
        weight = model.transformer.ln_f.weight  # the model dtype and device, cheap on quantized models
        self.model = model
        self.device = weight.device
        self.block_size = block_size
        self.cache = PagedKVCache.allocate(
            cfg.num_hidden_layers, num_blocks, block_size, cfg.num_kv_groups, cfg.head_dim, weight.dtype, weight.device
        )
        self.alibi_slopes = alibi_slopes(cfg.num_attention_heads).to(self.device) if cfg.alibi else None
        self.sampler = Sampler()
        self.req_id_to_generator: dict[str, torch.Generator | None] = {}
        if self.device.type == "cpu":
            native.library("bf16_gemm")  # compiled now (first run only), not inside the first request

    def free(self, request_id: str) -> None:
        """Forget a finished request's generator."""
        self.req_id_to_generator.pop(request_id, None)

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_starts, query_lens, context_lens, tables = [], [], [], []
        sampled, logits_indices = [], []
        bs = self.block_size
        for item in step.scheduled:
            req, start, n = item.request, item.start, item.num_tokens
            query_starts.append(len(ids))
            query_lens.append(n)
            context_lens.append(start + n)
            ids.extend(req.all_token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slots.extend(req.block_ids[p // bs] * bs + p % bs for p in range(start, start + n))
            tables.append(req.block_ids)
            if item.sample:
                sampled.append(req)
                logits_indices.append(len(ids) - 1)
        if not ids:
            return ModelRunnerOutput([], [], [])
        block_tables = torch.zeros(len(tables), max(len(t) for t in tables), dtype=torch.long)
        for row, table in enumerate(tables):
            block_tables[row, : len(table)] = torch.tensor(table)
        dev = self.device
        ctx = PagedAttention(
            self.cache,
            torch.tensor(slots, device=dev),
            query_starts,
            query_lens,
            context_lens,
            block_tables.to(dev),
            self.alibi_slopes,
        )
        logits = self.model(
            torch.tensor([ids], device=dev),
            position_ids=torch.tensor([positions], device=dev),
            attention=ctx,
            logits_indices=torch.tensor(logits_indices, device=dev),
        )
        if not sampled:
            return ModelRunnerOutput([], [], [])
        generators = [self._generator(r) for r in sampled]
        out = self.sampler(
            logits.float(),
            [r.sampling_params for r in sampled],
            [r.prompt_token_ids for r in sampled],
            [r.output_token_ids for r in sampled],
            generators,
        )
        return ModelRunnerOutput([r.request_id for r in sampled], out.token_ids, list(out.logprobs))

    def _generator(self, request) -> torch.Generator | None:
        if request.request_id not in self.req_id_to_generator:
            self.req_id_to_generator[request.request_id] = make_generator(request.sampling_params.seed)
        return self.req_id_to_generator[request.request_id]
