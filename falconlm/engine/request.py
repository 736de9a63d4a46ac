"""A request as the scheduler sees it: token ids, an ordered lifecycle status, and KV bookkeeping.

Pure Python (no torch): the scheduler, KV cache manager and block pool pass ids and counts.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from falconlm.engine.sampling_params import SamplingParams


class OutputGrammar(Protocol):
    """A request's structured-output state (``structured_output.GrammarState``), advanced by each sampled token."""

    def accept(self, token_id: int) -> bool:
        """Take the token; True when it ends the output."""
        ...


class RequestStatus(enum.IntEnum):
    """Lifecycle of a request; every finished state compares greater than PREEMPTED."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5


FINISH_REASON: dict[RequestStatus, str] = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class RequestEventType(enum.Enum):
    """What happened to a request; the scheduler records QUEUED, SCHEDULED and PREEMPTED, the engine FIRST_TOKEN."""

    QUEUED = "queued"  # added to the waiting queue
    SCHEDULED = "scheduled"  # admitted to the running batch (again after a preemption)
    PREEMPTED = "preempted"  # its blocks were taken back; it waits to be recomputed
    FIRST_TOKEN = "first_token"  # its first output token was sampled


@dataclass(frozen=True)
class RequestEvent:
    """One lifecycle event and when it happened (``time.monotonic()``)."""

    type: RequestEventType
    timestamp: float


def first_event_time(events: list[RequestEvent], event_type: RequestEventType) -> float | None:
    """When the first event of ``event_type`` happened, or None."""
    return next((e.timestamp for e in events if e.type == event_type), None)


def is_finished(status: RequestStatus) -> bool:
    """True for the FINISHED_* states."""
    return status > RequestStatus.PREEMPTED


@dataclass(eq=False)
class Request:
    """One sequence to generate.

    ``num_computed_tokens`` counts the leading tokens of ``all_token_ids`` whose KV is in the cache;
    ``block_ids`` is the request's block table (KV pages, in token order). ``sampling_params`` may be any
    object with ``max_tokens``, ``ignore_eos`` and ``stop_token_ids``.
    """

    request_id: str
    prompt_token_ids: list[int] = field(repr=False)
    sampling_params: SamplingParams = field(repr=False)
    eos_token_id: int | None
    arrival_time: float
    max_model_len: int
    output_token_ids: list[int] = field(default_factory=list, init=False, repr=False)
    status: RequestStatus = field(default=RequestStatus.WAITING, init=False)
    num_computed_tokens: int = field(default=0, init=False)
    block_ids: list[int] = field(default_factory=list, init=False, repr=False)
    state_slot: int | None = field(default=None, init=False, repr=False)  # recurrent-state slot (state_pool.py)
    num_cached_tokens: int = field(default=0, init=False)  # prefix-cache hit at first admission
    stop_reason: int | str | None = field(default=None, init=False)  # stop token id, or a stop string
    events: list[RequestEvent] = field(default_factory=list, init=False, repr=False)
    grammar: OutputGrammar | None = field(default=None, init=False, repr=False)  # structured output's state
    _all_token_ids: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r}: prompt_token_ids must not be empty")
        self._all_token_ids = list(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by output; the live list, read it but do not mutate it."""
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def max_tokens(self) -> int:
        """Effective output limit: the sampling limit, capped by what fits in ``max_model_len``."""
        room = self.max_model_len - self.num_prompt_tokens
        limit = self.sampling_params.max_tokens
        return room if limit is None else min(limit, room)

    @property
    def is_finished(self) -> bool:
        return is_finished(self.status)

    @property
    def skips_prefix_cache(self) -> bool:
        """True when the request asks for prompt logprobs: every prompt token must be computed, none reused."""
        return getattr(self.sampling_params, "prompt_logprobs", None) is not None

    def record(self, event_type: RequestEventType, timestamp: float | None = None) -> None:
        """Append a lifecycle event, stamped now unless ``timestamp`` is given."""
        self.events.append(RequestEvent(event_type, time.monotonic() if timestamp is None else timestamp))

    @property
    def stop_tokens(self) -> tuple[int, ...]:
        """The tokens whose sampling ends the request (``append_output_token``): EOS unless ignored, then
        ``stop_token_ids``."""
        params = self.sampling_params
        eos = () if params.ignore_eos or self.eos_token_id is None else (self.eos_token_id,)
        return (*eos, *(params.stop_token_ids or ()))

    def stops_at(self, token_id: int) -> bool:
        """Whether sampling ``token_id`` ends the request by a stop token: a decode run (``runner.py``) samples no
        further once a row has."""
        return token_id in self.stop_tokens

    @property
    def runs_ahead(self) -> bool:
        """Whether the request's next tokens may be sampled in one decode run, several model steps per schedule
        (``scheduler.py``): true unless what it samples depends on its own output other than through the model,
        as the repetition, presence and frequency penalties and a grammar do."""
        params = self.sampling_params
        penalties = (
            getattr(params, "repetition_penalty", 1.0) != 1.0
            or getattr(params, "presence_penalty", 0.0) != 0
            or getattr(params, "frequency_penalty", 0.0) != 0
        )
        return self.grammar is None and not penalties

    def append_output_token(self, token_id: int) -> RequestStatus | None:
        """Append a sampled token; return the finishing status it causes, else None.

        Does not change ``status``: the scheduler finishes the request and frees its blocks.
        """
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)
        params = self.sampling_params
        if not params.ignore_eos and token_id == self.eos_token_id:
            return RequestStatus.FINISHED_STOPPED
        if token_id in (params.stop_token_ids or ()):
            self.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
        if self.grammar is not None and self.grammar.accept(token_id):  # the grammar's end token
            return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= self.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None
