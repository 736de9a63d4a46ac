"""Tensor parallelism in the engine, rank 0's side: each forward pass is sent to the other ranks before it runs.

Rank 0 owns the scheduler, the requests and the sampler. Before each forward its runner describes the pass as a
:class:`~falconlm.engine.forward_batch.ForwardBatch` (token ids, positions, slots, block tables, logits rows,
state slots: integers only, never a Request) and broadcasts it; every follower (``tp_follower.py``) rebuilds the
same attention context over its own cache and makes the same model calls, so the sharded model's collectives
line up. Only rank 0 samples (the sharded head gathers the full logits).

On the wire a message is two int64 broadcasts from rank 0: a fixed header (kind, table width, row count, the
length of each field) and, when there is one, the payload (the fields one after another). Kinds: the runner's
plan once at start (its layout, KV block count, block size, state slots, deterministic flag, so every rank's
cache has rank 0's number of blocks), then forwards, keepalives while rank 0 is idle (a follower waits at most the
group's timeout for a message), and stop. A collective that fails or times out (a rank died) raises
:class:`TensorParallelError` and marks the channel broken: the group cannot go on, and nothing more is sent.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..parallel import ParallelState
from .forward_batch import FLAT_FIELDS, ForwardBatch

if TYPE_CHECKING:
    from .engine import Engine
    from .runner import ModelRunner

logger = logging.getLogger(__name__)

PLAN, FORWARD, KEEPALIVE, STOP = 1, 2, 3, 4
HEADER_LEN = 3 + len(FLAT_FIELDS)  # kind, block-table width, block-table rows, then each flat field's length
LAYOUTS = ("attention", "recurrent", "hybrid")
FUSED_OFF_REASON = "tensor parallel: the fused decode step runs every layer natively, without collectives"


class TensorParallelError(ConnectionError):
    """A rank of the tensor-parallel group died or stopped answering: the group cannot go on."""


@dataclass(frozen=True)
class RunnerPlan:
    """What every rank's runner must share with rank 0's: its kind, cache sizes and kernels."""

    layout: str  # one of LAYOUTS
    num_blocks: int  # KV blocks (0 for attention-free models)
    block_size: int
    num_slots: int  # recurrent-state slots (0 for attention-only models)
    deterministic: bool

    def encode(self) -> list[int]:
        flags = (LAYOUTS.index(self.layout), self.num_blocks, self.block_size, self.num_slots)
        return [*flags, int(self.deterministic)]

    @classmethod
    def decode(cls, values: list[int]) -> RunnerPlan:
        layout, blocks, block_size, slots, deterministic = values
        return cls(LAYOUTS[layout], blocks, block_size, slots, bool(deterministic))


def runner_layout(model) -> str:
    """Which runner a model takes: attention only, recurrent (Mamba) or hybrid (H1)."""
    cfg = model.config
    if getattr(cfg, "recurrent", False):
        return "recurrent"
    return "hybrid" if getattr(cfg, "hybrid", False) else "attention"


def plan_of(runner: ModelRunner, layout: str) -> RunnerPlan:
    return RunnerPlan(
        layout,
        getattr(runner, "num_blocks", 0),
        getattr(runner, "block_size", 0),
        getattr(runner, "num_slots", 0),
        runner.deterministic,
    )


_failed = False  # a collective of this process's group failed: it cannot run another one
_driving = False  # this process became rank 0 of an engine (its followers got, or are getting, a plan)


def group_failed() -> bool:
    """Whether a collective of the tensor-parallel group failed in this process (a rank died)."""
    return _failed


def release_followers(state: ParallelState) -> None:
    """On rank 0 at the end of a command: followers still waiting for a plan (no engine was built, or its build
    failed before the plan went out) get stop instead, so they exit now rather than at the timeout."""
    if state.is_driver and state.distributed and not _driving and not _failed:
        StepChannel(state).send_stop()


class StepChannel:
    """Messages from rank 0 to every rank over the group's broadcast (each with the group's timeout)."""

    def __init__(self, state: ParallelState) -> None:
        self.state = state
        self.broken = False
        self.last_send = time.monotonic()

    # ---- rank 0 ----
    def send_plan(self, plan: RunnerPlan) -> None:
        self._send(PLAN, [0, 0], plan.encode())

    def send_forward(self, batch: ForwardBatch) -> None:
        flat: list[int] = []
        lengths = []
        for name in FLAT_FIELDS:
            values = getattr(batch, name)
            lengths.append(len(values))
            flat.extend(int(v) for v in values)
        tables = batch.block_tables
        width = max((len(t) for t in tables), default=0)
        for table in tables:
            flat.extend(table)
            flat.extend([0] * (width - len(table)))
        self._send(FORWARD, [width, len(tables), *lengths], flat)

    def send_keepalive(self) -> None:
        self._send(KEEPALIVE, [0, 0], [])

    def send_stop(self) -> None:
        self._send(STOP, [0, 0], [])

    def _send(self, kind: int, sizes: list[int], payload: list[int]) -> None:
        header = [kind, *sizes, len(payload)] if kind != FORWARD else [kind, *sizes]
        header += [0] * (HEADER_LEN - len(header))
        self._broadcast(torch.tensor(header, dtype=torch.int64, device=self.state.device))
        if payload:
            self._broadcast(torch.tensor(payload, dtype=torch.int64, device=self.state.device))
        self.last_send = time.monotonic()

    # ---- followers ----
    def receive(self) -> tuple[int, RunnerPlan | ForwardBatch | None]:
        """The next message: (kind, its plan or forward batch, or None)."""
        header = self._receive(HEADER_LEN)
        kind = header[0]
        if kind == FORWARD:
            width, rows, *lengths = header[1:]
            flat = self._receive(sum(lengths) + width * rows)
            batch, at = ForwardBatch(), 0
            for name, n in zip(FLAT_FIELDS, lengths, strict=True):
                values = flat[at : at + n]
                setattr(batch, name, [bool(v) for v in values] if name == "fresh" else values)
                at += n
            batch.block_tables = [flat[at + r * width : at + (r + 1) * width] for r in range(rows)]
            return kind, batch
        if kind == PLAN:
            return kind, RunnerPlan.decode(self._receive(header[3]))
        if kind in (KEEPALIVE, STOP):
            return kind, None
        raise TensorParallelError(f"rank {self.state.rank} got an unknown message kind {kind} from rank 0")

    def _receive(self, n: int) -> list[int]:
        buffer = torch.empty(n, dtype=torch.int64, device=self.state.device)
        if n:
            self._broadcast(buffer)
        return buffer.tolist()

    def _broadcast(self, tensor: torch.Tensor) -> None:
        if self.broken:
            raise TensorParallelError("the tensor-parallel group already failed")
        try:
            dist.broadcast(tensor, src=0, group=self.state.group)
        except Exception as exc:  # gloo / NCCL raise RuntimeError subclasses, with long multi-line texts
            global _failed
            self.broken = _failed = True
            raise TensorParallelError(
                f"the tensor-parallel group failed on rank {self.state.rank} (a rank died or did not answer within "
                f"{self.state.timeout_s:g}s): {_first_sentence(exc)}"
            ) from None


def _first_sentence(exc: BaseException) -> str:
    """The gist of a backend error: its first sentence, without the ``[file.cc:line]`` prefix gloo puts first."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    end = text.find(". ")
    return text[: end + 1] if 0 < end < 300 else text[:300]


class TensorParallelDriver:
    """Rank 0's end: sends the plan at once, then each forward of ``runner``, keepalives while idle, and stop."""

    def __init__(self, state: ParallelState, runner: ModelRunner, layout: str) -> None:
        self.state = state
        self.channel = StepChannel(state)
        self.keepalive_interval_s = max(state.timeout_s / 4, 0.05)
        self.stopped = False
        global _driving
        _driving = True
        runner.fused_allowed = False
        self.channel.send_plan(plan_of(runner, layout))
        runner.on_forward = self.channel.send_forward

    @property
    def broken(self) -> bool:
        return self.channel.broken

    def tick(self) -> None:
        """Send a keepalive when nothing went to the followers for a while (call it often; it is cheap)."""
        if not self.stopped and time.monotonic() - self.channel.last_send >= self.keepalive_interval_s:
            self.channel.send_keepalive()

    def fail(self) -> None:
        """Mark the group failed (a step broke off midway, the followers may sit in another collective): nothing
        more is sent, not even stop."""
        global _failed
        self.channel.broken = _failed = True

    def stop(self) -> None:
        """Tell the followers to exit (once; nothing is sent over a group that already failed)."""
        if self.stopped or self.channel.broken:
            return
        self.stopped = True
        self.channel.send_stop()


def attach_driver(engine: Engine, state: ParallelState) -> TensorParallelDriver:
    """Make ``engine`` rank 0 of ``state``'s group: every forward of its runner goes to the followers first."""
    driver = TensorParallelDriver(state, engine.runner, runner_layout(engine.model))
    engine.parallel_driver = driver
    logger.info("tensor parallel: rank 0 of %d drives the steps; fused decode step off (%s)", state.world_size,
                FUSED_OFF_REASON)  # fmt: skip
    return driver
