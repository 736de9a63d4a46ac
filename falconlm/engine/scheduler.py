"""Scheduler: continuous batching over a paged KV cache, in the vLLM v1 style.

Pure Python (no torch). There are no prefill or decode phases: each request's ``num_computed_tokens``
chases its ``num_tokens``, and each step hands some tokens to each request within a token budget
(``max_num_batched_tokens``). Chunked prefill, prefix-cache hits and decodes share one step.

Order of a step: running requests first, oldest first; when blocks run out, the newest running request is
preempted (blocks freed, recomputed later from the front of the waiting queue). Waiting requests are
admitted FIFO only in steps without preemption.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from falconlm.engine.kv_cache_manager import KVCacheManager
from falconlm.engine.request import Request, RequestEventType, RequestStatus, is_finished
from falconlm.engine.scheduler_output import ModelRunnerOutput, RequestUpdate, ScheduledRequest, SchedulerOutput
from falconlm.engine.stats import SchedulerStats

__all__ = [
    "ModelRunnerOutput",
    "QueueFullError",
    "RequestUpdate",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerOutput",
]


class QueueFullError(RuntimeError):
    """The waiting queue holds ``max_waiting`` requests already."""


class Scheduler:
    """Owns the waiting queue and the running set, and decides each step's rows."""

    def __init__(
        self,
        kv_cache_manager: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_waiting: int | None = None,
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.kv_cache_manager = kv_cache_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the last one is the newest
        self.req_id_to_request: dict[str, Request] = {}
        self.num_preemptions = 0

    # ---- queries ------------------------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def stats(self) -> SchedulerStats:
        """A frozen snapshot of the queues and the preemption count."""
        return SchedulerStats(self.num_running, self.num_waiting, self.num_preemptions)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id, or None."""
        return self.req_id_to_request.get(request_id)

    # ---- requests in and out ------------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request at the back of the waiting queue."""
        if request.request_id in self.req_id_to_request:
            raise ValueError(f"request id {request.request_id!r} is already in the scheduler")
        if self.max_waiting is not None and len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests)")
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        self.req_id_to_request[request.request_id] = request
        request.record(RequestEventType.QUEUED)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """Finish requests from outside (stop string, client gone); unknown or finished ids are ignored."""
        if not is_finished(status):
            raise ValueError(f"{status!r} is not a finished status")
        for request_id in request_ids:
            request = self.req_id_to_request.get(request_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._finish(request, status)

    # ---- one step -----------------------------------------------------------------------------------------------

    def schedule(self, num_steps: int = 1) -> SchedulerOutput:
        """Choose this step's rows: running requests first, then waiting ones if nobody was preempted.
        ``num_steps`` > 1 asks for a decode run of up to that many model steps (see :meth:`_run_length`)."""
        output = SchedulerOutput(scheduled=[], num_batched_tokens=0, continued=bool(self.running))
        budget = self._schedule_running(output, self.max_num_batched_tokens)
        if not output.preempted_ids:
            self._schedule_waiting(output, budget)
        output.num_batched_tokens = sum(row.num_tokens for row in output.scheduled)
        if num_steps > 1 and not (self.waiting or output.preempted_ids or output.aborted):
            output.num_steps = self._run_length(output.scheduled, num_steps)
        return output

    def _run_length(self, rows: list[ScheduledRequest], num_steps: int) -> int:
        """How many model steps this schedule's rows run, each step sampling every row's next token from the
        tokens the step before sampled (vLLM's multi-step scheduling): up to ``num_steps`` when every running
        request is in the step as a decode row, none waits (a run delays the next admission), each may run ahead
        (``Request.runs_ahead``), none would pass its ``max_tokens``, and the KV cache has slots for every row's
        whole run without preempting; else 1. A decode step at batch 1 spends about 0.5 ms in Python around the
        model's one native call (bench-1b, 5% of the step); a run spends it once."""
        if len(rows) != len(self.running) or not all(r.num_tokens == 1 and r.sample for r in rows):
            return 1
        if not all(r.request.runs_ahead for r in rows):
            return 1
        steps = min(num_steps, *(r.request.max_tokens - r.request.num_output_tokens for r in rows))
        if steps <= 1:
            return 1
        for row in rows:  # blocks taken for a run that does not happen stay with their request, for its next steps
            if self.kv_cache_manager.allocate_slots(row.request, steps) is None:
                return 1
        return steps

    def update_from_output(self, output: SchedulerOutput, runner_output: ModelRunnerOutput) -> list[RequestUpdate]:
        """Advance each scheduled request by its computed tokens, append sampled tokens, finish the done ones."""
        req_id_to_row = {request_id: row for row, request_id in enumerate(runner_output.request_ids)}
        updates: list[RequestUpdate] = []
        num_finished = 0
        for scheduled in output.scheduled:
            request = scheduled.request
            if request.is_finished:  # finished from outside between schedule() and now
                continue
            request.num_computed_tokens += scheduled.num_tokens
            if not scheduled.sample:
                self.kv_cache_manager.cache_full_blocks(request)
                continue
            row = req_id_to_row[request.request_id]
            token_ids = [runner_output.sampled_token_ids[row]]
            logprobs = [runner_output.logprobs[row] if runner_output.logprobs else None]
            if runner_output.later_token_ids:  # a decode run: each later token's input was the one before
                token_ids += runner_output.later_token_ids[row]
                logprobs += runner_output.later_logprobs[row]
            status = None
            for i, token_id in enumerate(token_ids):
                if i:  # the run computed the previous token's KV to sample this one
                    request.num_computed_tokens += 1
                status = request.append_output_token(token_id)
                if status is not None:
                    del token_ids[i + 1 :], logprobs[i + 1 :]
                    break
            self.kv_cache_manager.cache_full_blocks(request)
            if status is not None:
                self._finish(request, status)
                num_finished += 1
            updates.append(RequestUpdate(request, token_ids, logprobs, finished=status is not None))
        if num_finished:
            self.running = [request for request in self.running if not request.is_finished]
        return updates

    # ---- helpers ------------------------------------------------------------------------------------------------

    def _schedule_running(self, output: SchedulerOutput, budget: int) -> int:
        """Give each running request, oldest first, the tokens it lacks within the budget; preempt on need."""
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new_tokens <= 0:  # nothing to compute (should not happen: a running request lacks a token)
                i += 1
                continue
            while self.kv_cache_manager.allocate_slots(request, num_new_tokens) is None:
                if len(self.running) == 1:  # alone and the whole pool is still too small: it can never fit
                    self.running.pop()
                    self._finish(request, RequestStatus.FINISHED_ABORTED)
                    output.aborted.append(request)
                    break
                victim = self.running[-1]
                self._preempt(victim)
                output.preempted_ids.append(victim.request_id)
                if victim is request:
                    break
            else:
                output.scheduled.append(self._row(request, num_new_tokens))
                budget -= num_new_tokens
                i += 1
        return budget

    def _schedule_waiting(self, output: SchedulerOutput, budget: int) -> None:
        """Admit waiting requests FIFO while budget and seats last; stop at the first that does not fit."""
        manager = self.kv_cache_manager
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            if request.max_tokens < 1 or manager.num_blocks_for(request.num_tokens) > manager.num_blocks:
                self.waiting.popleft()
                self._finish(request, RequestStatus.FINISHED_ABORTED)
                output.aborted.append(request)
                continue
            computed_blocks, num_hit_tokens = manager.get_computed_blocks(request)
            num_new_tokens = min(request.num_tokens - num_hit_tokens, budget)
            if manager.allocate_slots(request, num_new_tokens, computed_blocks) is None:
                break
            self.waiting.popleft()
            if request.status == RequestStatus.WAITING:
                request.num_cached_tokens = num_hit_tokens
            request.num_computed_tokens = num_hit_tokens
            request.status = RequestStatus.RUNNING
            request.record(RequestEventType.SCHEDULED)
            self.running.append(request)
            output.scheduled.append(self._row(request, num_new_tokens))
            budget -= num_new_tokens

    def _preempt(self, request: Request) -> None:
        """Free a running request's blocks and put it at the front of the waiting queue, to recompute later."""
        self.running.remove(request)
        self.kv_cache_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
        self.num_preemptions += 1
        request.record(RequestEventType.PREEMPTED)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        """Mark finished and release blocks; the caller has already taken it out of waiting/running."""
        request.status = status
        self.kv_cache_manager.free(request)
        del self.req_id_to_request[request.request_id]

    @staticmethod
    def _row(request: Request, num_tokens: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        return ScheduledRequest(request, num_tokens, start, sample=start + num_tokens == request.num_tokens)
