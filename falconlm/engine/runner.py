"""ModelRunner: owns the paged KV cache tensors; turns a SchedulerOutput into forward passes and new tokens.

It makes no scheduling decisions (the scheduler did): it flattens the step's tokens, computes each token's slot
and position, runs the model's ``forward_hidden`` with a :class:`PagedAttention` context, and takes
``compute_logits`` of the rows that reached the end of their known tokens to sample them. It makes the one
per-step kernel choice (``kernels.py``): decode rows run every layer in one native call when the model allows it
(``fused_decode.py``), apart from prompt chunks, which take the model's torch forward (or, for bfloat16 weights
where the panel GEMM is the prompt GEMM, a fused call of their own: ``FusedDecoder.takes_prompts``). So a decoding
request is computed the same way whatever else is in the step.

Each forward is first described as a :class:`ForwardBatch` (plain integers, no Request), then run from that alone
(:meth:`ModelRunner.run_batch`): under tensor parallelism rank 0 sends the description to the other ranks, which
run the same forward over their own caches (``tp_runner.py``, ``tp_follower.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..model.falcon import FalconForCausalLM
from ..model.falcon3 import Falcon3ForCausalLM
from ..model.paged_attention import PagedAttention, PagedKVCache
from ..model.positions import engine_rope_length, head_alibi_slopes, is_dynamic
from .decode_run import greedy_rows
from .forward_batch import ForwardBatch
from .fused_decode import FusedDecoder, fused_decoder, fused_hidden
from .kernels import bind_weight_kernels, log_choice, row_attention
from .prompt_logprobs import PromptRows, prompt_rows, score_prompt_rows
from .request import Request
from .sampler import Sampler, make_generator
from .scheduler_output import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from .structured_output import grammar_bitmask

FUSED_FAMILIES = (FalconForCausalLM, Falcon3ForCausalLM)  # the models whose blocks the fused decode step runs


class ModelRunner:
    """One model, its paged KV cache, the sampler and the per-request random generators.

    ``deterministic`` forces the batch-invariant kernels everywhere: every bfloat16 matmul natively whatever its
    row count, and prompt chunks attended a token at a time by the row kernel (slower prefill; see README). Where
    the fused decode step applies, prompt tokens go through it too, each as a row of its own: its float32
    residual stream differs from the torch forward's, so a prompt whose last chunk happens to be one token (a
    decode-shaped row) would otherwise take the other path than the same prompt in one chunk. For the same reason,
    where prompt chunks run fused as prompt rows (``FusedDecoder.takes_prompts``), a prompt's chunk of one token
    goes with them rather than with the decode rows.

    A schedule may ask for a decode run (``SchedulerOutput.num_steps`` > 1): the step's decode rows then go on for
    up to that many model steps in this one call (:meth:`_run_on`)."""

    DECODE_RUNS = True  # the recurrent runners keep to one step per schedule

    def __init__(self, model: FalconForCausalLM, num_blocks: int, block_size: int, deterministic: bool = False) -> None:
        cfg = model.config
        weight = model.final_norm.weight  # the model dtype and device, cheap on quantized models
        self.model = model
        self.device = weight.device
        self.block_size = block_size
        self.deterministic = deterministic
        self.cache = PagedKVCache.allocate(
            cfg.num_hidden_layers, num_blocks, block_size, cfg.num_kv_groups, cfg.head_dim, weight.dtype, weight.device
        )
        self.alibi_slopes = head_alibi_slopes(cfg).to(self.device) if cfg.alibi else None
        self.dynamic_rope = is_dynamic(cfg)  # each token's RoPE frequencies depend on its request's length
        self.sampler = Sampler()
        self.req_id_to_generator: dict[str, torch.Generator | None] = {}
        if self.device.type == "cpu":
            bind_weight_kernels(model, invariant=deterministic)
            log_choice()
        self.row_attention = row_attention(self.device)
        self.num_blocks = num_blocks
        self.fused_allowed = True  # False under tensor parallelism: the fused step has no collectives
        self.on_forward: Callable[[ForwardBatch], None] | None = None  # sees each forward first (tp_runner.py)

    def free(self, request_id: str) -> None:
        """Forget a finished request's generator."""
        self.req_id_to_generator.pop(request_id, None)

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        if step.num_steps > 1 and (out := self._native_run(step)) is not None:
            return out
        out = self._execute_step(step)
        if step.num_steps > 1 and out.request_ids:
            self._run_on(step, out)
        return out

    def _native_run(self, step: SchedulerOutput) -> ModelRunnerOutput | None:
        """A whole decode run in one native call (:meth:`_greedy_run`), first step included, where every row is
        a greedy decode row past its prompt; None otherwise (the run's steps then go as :meth:`_run_on` says)."""
        items = step.scheduled
        if not all(item.num_tokens == 1 and item.sample and not _in_prompt(item) for item in items):
            return None
        decoder = self._fused_decoder()
        if decoder is None or not (decoder.usable if step.continued else decoder.refresh()):
            return None
        tokens = [item.request.all_token_ids[item.start] for item in items]
        ran = self._greedy_run(decoder, items, 0, tokens, step.num_steps)
        if ran is None:
            return None
        rows = list(zip(*ran, strict=True))  # per row, its token of each step
        return ModelRunnerOutput(
            [item.request.request_id for item in items],
            [row[0] for row in rows],
            [None] * len(items),
            later_token_ids=[list(row[1:]) for row in rows],
            later_logprobs=[[None] * (len(row) - 1) for row in rows],
        )

    def _greedy_run(
        self, decoder: FusedDecoder, items: list[ScheduledRequest], offset: int, tokens: list[int], steps: int
    ) -> list[list[int]] | None:
        """Up to ``steps`` decode steps of ``items``' requests, ``offset`` positions past each item's start, fed
        ``tokens``, in one native call (``FusedDecoder.run``): each step's tokens, or None where the rows are not
        all greedy (``decode_run.greedy_rows``) or the model's embedding or head is not one the library reads."""
        requests = [item.request for item in items]
        if not greedy_rows([r.sampling_params for r in requests]) or not decoder.runs(
            self.model, self.cache.k, len(items)
        ):
            return None  # asked before the rows are described: a declined run costs nothing
        rows = [ScheduledRequest(r, 1, item.start + offset, True) for r, item in zip(requests, items, strict=True)]
        decode_rows = self._attention(self._describe(rows, tokens)[0]).decode_rows()
        return None if decode_rows is None else decoder.run(self.model, decode_rows, tokens, steps, requests)

    def takes_decode_runs(self) -> bool:
        """Whether this runner runs a schedule's decode rows for several steps (``SchedulerOutput.num_steps``):
        not under tensor parallelism, whose other ranks repeat each forward of a step, one per step."""
        return self.DECODE_RUNS and self.on_forward is None

    def _run_on(self, step: SchedulerOutput, out: ModelRunnerOutput) -> None:
        """A decode run's later steps, after a first that went as a single step, into ``out.later_token_ids`` /
        ``later_logprobs``: in one native call where the rows allow (:meth:`_greedy_run`), else step by step here.
        Each is a decode step of the same requests one position on, fed the tokens the step before sampled,
        through the same forward, head and sampler as a single step, so every row's tokens are those that step
        after step would give. The run ends early once a row samples a stop token: the scheduler drops what a
        finished request sampled after it."""
        by_id = {item.request.request_id: item for item in step.scheduled}
        items = [by_id[request_id] for request_id in out.request_ids]
        requests = [item.request for item in items]
        params = [r.sampling_params for r in requests]
        prompts = [r.prompt_token_ids for r in requests]
        outputs = [r.output_token_ids for r in requests]  # one step behind: read only by penalties, which no run has
        generators = [self._generator(r) for r in requests]
        decoder = self._fused_decoder()
        if decoder is not None and not decoder.usable:  # the run's first step refreshed it
            decoder = None
        out.later_token_ids = [[] for _ in items]
        out.later_logprobs = [[] for _ in items]
        tokens = out.sampled_token_ids
        if any(r.stops_at(t) for r, t in zip(requests, tokens, strict=True)):
            return
        ran = None if decoder is None else self._greedy_run(decoder, items, 1, tokens, step.num_steps - 1)
        if ran is not None:
            for i, (later, later_logprobs) in enumerate(zip(out.later_token_ids, out.later_logprobs, strict=True)):
                later += [chosen[i] for chosen in ran]
                later_logprobs += [None] * len(ran)
            return
        for j in range(1, step.num_steps):
            if j > 1 and any(r.stops_at(t) for r, t in zip(requests, tokens, strict=True)):
                break
            rows = [ScheduledRequest(r, 1, item.start + j, True) for r, item in zip(requests, items, strict=True)]
            batch, _, _ = self._describe(rows, tokens)
            logits = self.model.compute_logits(self.logits_states(batch, decoder)).float()
            sampled = self.sampler(logits, params, prompts, outputs, generators)
            tokens = sampled.token_ids
            for later, later_logprobs, token, logprobs in zip(
                out.later_token_ids, out.later_logprobs, tokens, sampled.logprobs, strict=True
            ):
                later.append(token)
                later_logprobs.append(logprobs)

    def _execute_step(self, step: SchedulerOutput) -> ModelRunnerOutput:
        """One model step over ``step``'s rows: its forward passes, head and sampler."""
        decoder = self._fused_decoder()
        if decoder is not None and not (decoder.usable if step.continued else decoder.refresh()):
            decoder = None  # the model no longer runs fused (FusedDecoder.refresh)
        groups = [(step.scheduled, False)]
        one_path = decoder is not None and self.deterministic  # every token a row of the fused step (token_rows)
        if not one_path and (decoder is not None or self.deterministic):  # decode rows apart from prompt chunks
            # Where prompt chunks run as prompt rows of the fused step, a prompt's lone token (its last, when the
            # budget leaves one) is a prompt row too: its sums then never depend on how the prompt was cut.
            fused_prompts = decoder is not None and decoder.takes_prompts()

            def is_chunk(item: ScheduledRequest) -> bool:
                return item.num_tokens > 1 or (fused_prompts and _in_prompt(item))

            decodes = [item for item in step.scheduled if not is_chunk(item)]
            chunks = [item for item in step.scheduled if is_chunk(item)]
            groups = [(group, group is chunks) for group in (decodes, chunks) if group]
        sampled: list[Request] = []
        logits: list[torch.Tensor] = []
        prompt_logprobs: dict[str, tuple[int, list]] = {}
        for requests, group_prompt_rows, group_logits in self._forward_groups(groups, decoder):
            sampled += requests
            if group_logits is not None:
                logits.append(group_logits[: len(requests)])
                prompt_logprobs |= score_prompt_rows(group_logits[len(requests) :], group_prompt_rows)
        if not sampled:
            return ModelRunnerOutput([], [], [], prompt_logprobs)
        generators = [self._generator(r) for r in sampled]
        logits_all = (logits[0] if len(logits) == 1 else torch.cat(logits)).float()
        out = self.sampler(
            logits_all,
            [r.sampling_params for r in sampled],
            [r.prompt_token_ids for r in sampled],
            [r.output_token_ids for r in sampled],
            generators,
            grammar_bitmask([r.grammar for r in sampled], logits_all.shape[1]),
        )
        return ModelRunnerOutput([r.request_id for r in sampled], out.token_ids, list(out.logprobs), prompt_logprobs)

    def _fused_decoder(self) -> FusedDecoder | None:
        """The native all-layers decode step for this step's decode rows, None where it does not apply."""
        # The fused step takes Falcon's and Falcon3's blocks (other families say why in `falconlm info`), and it runs
        # every layer in C++ without collectives, so never under tensor parallelism (``fused_allowed`` False).
        fused = self.fused_allowed and self.device.type == "cpu" and isinstance(self.model, FUSED_FAMILIES)
        return fused_decoder(self.model.decoder) if fused else None

    def _forward(
        self, items: list[ScheduledRequest], decoder: FusedDecoder | None, prompt_chunks: bool = False
    ) -> tuple[list[Request], list[PromptRows], torch.Tensor | None]:
        """One forward pass over ``items``: the requests to sample, the prompt-logprob rows, and the hidden states
        [R, H] of the rows to sample followed by those of the prompt-logprob rows (None if no row).
        ``prompt_chunks``: as for :meth:`run_batch`."""
        batch, sampled, scored = self._describe(items)
        if not batch.num_tokens:
            return [], [], None
        if self.on_forward is not None:  # tensor parallel: the other ranks make the same forward
            self.on_forward(batch)
        return sampled, scored, self.logits_states(batch, decoder, prompt_chunks)

    def _forward_groups(
        self, groups: list[tuple[list[ScheduledRequest], bool]], decoder: FusedDecoder | None
    ) -> list[tuple[list[Request], list[PromptRows], torch.Tensor | None]]:
        """:meth:`_forward` of each (items, prompt_chunks) group, with the logits of its rows in place of their
        hidden states. A step's decode rows and prompt chunks are separate forwards, but their rows meet the output
        head in one call: a prompt's last token alone streams the whole head for one row (bench-194m's served load
        made 52 such calls, 0.19 s of 22 s). The head's rows are summed apart from each other, so no row's logits
        change. Under tensor parallelism the other ranks repeat each forward with its own head call
        (:meth:`run_batch`), whose collectives must meet rank 0's in the same order: there each forward's head
        call comes right after it."""
        if self.on_forward is not None:
            out = []
            for group, prompt_chunks in groups:
                requests, scored, states = self._forward(group, decoder, prompt_chunks)
                out.append((requests, scored, None if states is None else self.model.compute_logits(states)))
            return out
        forwards = [self._forward(group, decoder, prompt_chunks) for group, prompt_chunks in groups]
        present = [states for _, _, states in forwards if states is not None]
        if not present:
            return forwards
        head_rows = present[0] if len(present) == 1 else torch.cat(present)
        merged = iter(self.model.compute_logits(head_rows).split([s.shape[0] for s in present]))
        return [(requests, scored, None if states is None else next(merged)) for requests, scored, states in forwards]

    def _describe(
        self, items: list[ScheduledRequest], tokens: list[int] | None = None
    ) -> tuple[ForwardBatch, list[Request], list[PromptRows]]:
        """The forward pass of ``items`` as plain data, the requests it samples and its prompt-logprob rows.
        ``tokens``: each item's one token, not yet in its request (a decode run's later steps)."""
        batch = ForwardBatch()
        sampled = []
        for i, item in enumerate(items):
            req, start, n = item.request, item.start, item.num_tokens
            batch.query_starts.append(batch.num_tokens)
            batch.query_lens.append(n)
            if tokens is None:
                batch.token_ids.extend(req.all_token_ids[start : start + n])
            else:
                batch.token_ids.append(tokens[i])
            self._describe_row(batch, item)
            if item.sample:
                sampled.append(req)
                batch.logits_rows.append(batch.num_tokens - 1)
        if not batch.num_tokens:
            return batch, [], []
        scored = prompt_rows(items, batch.query_starts)
        batch.logits_rows += [i for part in scored for i in part.flat_indices]
        return batch, sampled, scored

    def _describe_row(self, batch: ForwardBatch, item: ScheduledRequest) -> None:
        """What this runner's model needs of one row beyond its tokens: positions, KV slots and block table
        (models with recurrent state add theirs, ``recurrent_runner.py``, ``hybrid_runner.py``)."""
        req, start, n = item.request, item.start, item.num_tokens
        bs = self.block_size
        batch.context_lens.append(start + n)
        batch.positions.extend(range(start, start + n))
        if self.dynamic_rope:
            batch.rope_lengths.extend(engine_rope_length(req.num_prompt_tokens, p) for p in range(start, start + n))
        batch.kv_slots.extend(req.block_ids[p // bs] * bs + p % bs for p in range(start, start + n))
        batch.block_tables.append(list(req.block_ids))

    def run_batch(
        self, batch: ForwardBatch, decoder: FusedDecoder | None = None, prompt_chunks: bool = False
    ) -> torch.Tensor | None:
        """The model's forward over ``batch``: logits of its ``logits_rows`` (None when it has none).
        ``prompt_chunks``: every row is a prompt chunk, so that one of a single token is never taken for a decode
        row (it goes where the other chunks go)."""
        states = self.logits_states(batch, decoder, prompt_chunks)
        return None if states is None else self.model.compute_logits(states)

    def logits_states(
        self, batch: ForwardBatch, decoder: FusedDecoder | None = None, prompt_chunks: bool = False
    ) -> torch.Tensor | None:
        """The model's forward over ``batch``: the hidden states [R, H] of its ``logits_rows``, which the output
        head takes (None when it has none). ``prompt_chunks``: as for :meth:`run_batch`."""
        ctx, dev = self._attention(batch), self.device
        input_ids = torch.tensor([batch.token_ids], device=dev)
        position_ids = torch.tensor([batch.positions], device=dev)
        lengths = torch.tensor([batch.rope_lengths], device=dev) if self.dynamic_rope else None
        rows_kv = None  # every row adds one token (else None); deterministic: each token a row, prompts too
        prompt = False  # prompt chunks' tokens as rows, through the fused step's weight panels (takes_prompts)
        if decoder is not None:
            if self.deterministic:
                rows_kv = ctx.token_rows()
            elif not prompt_chunks:
                rows_kv = ctx.decode_rows()
            if rows_kv is None and decoder.takes_prompts():
                rows_kv, prompt = ctx.token_rows(), True
        if rows_kv is not None:
            # A decoder comes from execute(), which refreshed it where the step starts a run (FusedDecoder.refresh)
            hidden = fused_hidden(
                self.model, decoder, input_ids, position_ids, rows_kv, lengths, prompt, False, batch.logits_rows
            )
            if hidden is not None:
                return rows_of(hidden, batch.logits_rows)
        states = self._hidden(batch, input_ids, position_ids, ctx, lengths)
        return states if batch.logits_rows else None

    def _attention(self, batch: ForwardBatch) -> PagedAttention:
        """The paged-attention context of ``batch``: its KV slots, rows and block tables over this runner's cache."""
        width = max(map(len, batch.block_tables))
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in batch.block_tables], dtype=torch.long)
        dev = self.device
        return PagedAttention(
            self.cache,
            torch.tensor(batch.kv_slots, device=dev),
            batch.query_starts,
            batch.query_lens,
            batch.context_lens,
            block_tables.to(dev),
            self.alibi_slopes,
            row_attention=self.row_attention,
            per_token_chunks=self.deterministic,
        )

    def _hidden(
        self,
        batch: ForwardBatch,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        ctx: PagedAttention,
        rope_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The model's torch forward over the step's flattened tokens: the states [R, H] of its ``logits_rows``,
        the only rows its last layer runs past their K/V (models with more state than the KV cache add theirs
        here, ``hybrid_runner.py``)."""
        if reads_every_row(batch.logits_rows, batch.num_tokens):  # decode steps: nothing to skip, nothing to gather
            return self.model.forward_hidden(input_ids, position_ids, ctx, rope_lengths).flatten(0, 1)
        rows = torch.tensor(batch.logits_rows, dtype=torch.long, device=input_ids.device)
        return self.model.forward_hidden(input_ids, position_ids, ctx, rope_lengths, out_rows=rows)

    def _generator(self, request: Request) -> torch.Generator | None:
        if request.request_id not in self.req_id_to_generator:
            self.req_id_to_generator[request.request_id] = make_generator(request.sampling_params.seed)
        return self.req_id_to_generator[request.request_id]


def rows_of(hidden: torch.Tensor, rows: list[int]) -> torch.Tensor | None:
    """Flat rows ``rows`` of ``hidden`` [..., H] as [R, H] (None for none): a decode step's rows are all of them in
    order, taken as they are rather than gathered into a copy."""
    if not rows:
        return None
    flat = hidden.reshape(-1, hidden.shape[-1])
    if reads_every_row(rows, flat.shape[0]):
        return flat
    return flat[torch.tensor(rows, dtype=torch.long, device=flat.device)]


def reads_every_row(rows: list[int], num_rows: int) -> bool:
    """Whether ``rows`` are all ``num_rows`` rows in order (a decode step's), so taking them changes nothing."""
    return len(rows) == num_rows and rows == list(range(num_rows))


def _in_prompt(item: ScheduledRequest) -> bool:
    """Whether ``item``'s tokens are its request's prompt (a chunk of it), not a token the request generated."""
    return item.start < item.request.num_prompt_tokens
