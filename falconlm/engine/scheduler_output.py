"""The step contract between the Scheduler (policy, ids and counts) and the ModelRunner (tensors).

A step is ``schedule()`` -> ``runner.execute_model(scheduler_output)`` -> ``update_from_output(...)``.
Pure Python (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from falconlm.engine.request import Request


@dataclass
class ScheduledRequest:
    """One row of a step: compute ``request.all_token_ids[start:start + num_tokens]``.

    Their KV goes to the slots ``block_ids[p // block_size] * block_size + p % block_size`` for each position
    ``p``; attention reads positions ``0..start + num_tokens - 1`` from the request's ``block_ids``.
    """

    request: Request  # the live object: the runner reads sampling params, token ids and block ids from it
    num_tokens: int
    start: int  # request.num_computed_tokens before the step
    sample: bool  # start + num_tokens == request.num_tokens: the row reaches the end, so a token is sampled


@dataclass
class SchedulerOutput:
    """What to run this step, in row order."""

    scheduled: list[ScheduledRequest]
    num_batched_tokens: int
    preempted_ids: list[str] = field(default_factory=list)
    aborted: list[Request] = field(default_factory=list)  # finished by the scheduler: they can never fit
    # Requests were running when this step was scheduled: the engine has not been idle since the previous step.
    continued: bool = False
    # A decode run: every row a decode row, run for up to this many model steps, each feeding the tokens sampled
    # by the one before; every row has KV slots for them all (Scheduler.schedule).
    num_steps: int = 1


@dataclass
class ModelRunnerOutput:
    """What the runner sampled: one entry per row with ``sample=True``."""

    request_ids: list[str]
    sampled_token_ids: list[int]
    logprobs: list[object | None] = field(default_factory=list)  # opaque to the scheduler; may be empty
    # request id -> (first prompt position scored, its logprobs), for rows that asked for prompt logprobs
    prompt_logprobs: dict[str, tuple[int, list[object]]] = field(default_factory=dict)
    # A decode run's later steps (SchedulerOutput.num_steps > 1): per row, the tokens sampled after the first, and
    # their logprobs (entries None where the row asked for none). Empty for a single step.
    later_token_ids: list[list[int]] = field(default_factory=list)
    later_logprobs: list[list[object | None]] = field(default_factory=list)


@dataclass
class RequestUpdate:
    """A request's progress from one step, for the engine to detokenize and stream."""

    request: Request
    new_token_ids: list[int]
    logprobs: list[object | None]
    finished: bool
