"""Batch jobs spread over Ray actors: data parallelism for ``falconlm batch run --ray``.

Each actor (:class:`EngineWorker`) holds its own falconlm engine, built from the same :class:`EngineArgs` as a
local run, and answers *chunks* of stored requests: the requests of a chunk run at once, so continuous batching
works inside each actor, and several small chunks per actor keep the actors evenly busy.

The driver (:class:`RayBatchRunner`) is the only process that touches the job store. It reads pending requests
in input order, hands out chunks, and commits each returned chunk in one transaction; a result for a request
already recorded is dropped by the store, so nothing is ever recorded twice.

Failures. Actors are created without Ray's ``max_restarts``: when a chunk fails with ``RayActorError`` (the actor
process died, its node was lost, ...) the driver kills that actor for good, starts a replacement in its slot (at
most ``max_replacements`` in the whole run) and queues the chunk's requests again, one request per chunk, so
that a request that kills its actor is singled out. A request that was on a dying actor ``max_attempts`` times
is answered with an error line instead of taking the job down (a request that merely shared a chunk or an actor
with the culprit is counted too, so this bound is loose on purpose). Doing this in the driver rather than with Ray's
restarts and task retries keeps the bound on re-runs and the accounting of lost work in one place. If the driver
dies, its actors die with it (they are owned by its Ray job) and the store holds exactly the committed results:
the same command resumes.

Tensor parallelism (``--tensor-parallel-size N``): each engine is N actors placed together (``ray_tp.py``); the
driver sees the engine as its rank-0 actor, the one that answers chunks, and retires or replaces its N actors
together: any rank that dies is that engine's death.

``RayCluster.worker_class`` / ``follower_class`` are the actors' classes; tests put subclasses there that die on
purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..engine.async_engine import AsyncEngine
from ..engine.factory import EngineArgs, build_engine
from ..serving.settings import ServerSettings
from .execute import LeftPending, RequestExecutor, failed
from .ray_tp import FollowerWorker, free_address, join_environment
from .records import Job, PendingRequest, Result
from .runner import PAGE_SIZE, BatchRunner
from .store import Store

logger = logging.getLogger(__name__)

RAY_MISSING = "ray is not installed; pip install 'falconlm[ray]' to use --ray"
CHUNKS_PER_ACTOR = 4  # chunks handed to an actor at once: one finishing leaves the others running
ENGINE_START_S = 600.0
PROBE_S = 10.0


class RayUnavailable(RuntimeError):
    """Ray cannot be imported here."""


class RayJobError(RuntimeError):
    """The Ray part of a job failed (no actor could start, all of them died, no progress): the job can resume."""


def import_ray() -> Any:
    """The ``ray`` module, imported only when asked for; :class:`RayUnavailable` (one line) without it."""
    try:
        import ray
    except ImportError:
        raise RayUnavailable(RAY_MISSING) from None
    return ray


def check_address(address: str | None, timeout_s: float = PROBE_S) -> None:
    """Fail at once (RayJobError, one line) when a ``host:port`` address takes no connection: Ray itself would
    retry it for minutes. Other forms ("auto", "ray://...") are left to Ray."""
    if not address or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise RayJobError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


@dataclass
class RayOptions:
    """Where and how wide to run.

    ``address`` None starts a local Ray instance (stopped again at the end); otherwise it is a cluster's address
    (or "auto") to connect to. ``actors`` counts engines (each is ``tensor_parallel_size`` actors, one per rank);
    ``threads`` is torch threads per actor (rank). None derives them from the cluster's CPUs (2 engines, or CPUs /
    (threads x ranks); threads = CPUs / (engines x ranks)). ``max_in_flight``: requests in one
    actor at once. ``max_replacements`` None: 2 per actor. ``stall_timeout_s``: the run fails (resumably) when
    no chunk comes back for this long.
    """

    address: str | None = None
    actors: int | None = None
    threads: int | None = None
    max_in_flight: int = 32
    max_replacements: int | None = None
    max_attempts: int = 3
    start_timeout_s: float = ENGINE_START_S
    stall_timeout_s: float = 1800.0


def actor_shape(cpus: int, actors: int | None, threads: int | None, ranks: int = 1) -> tuple[int, int]:
    """(engines, threads per actor) for a cluster of ``cpus`` CPUs when either or both are not given; an engine is
    ``ranks`` actors."""
    cpus = max(1, cpus // max(1, ranks))
    if actors is None:
        actors = max(1, cpus // threads) if threads is not None else min(2, cpus)
    if threads is None:
        threads = max(1, cpus // actors)
    return actors, threads


class EngineWorker:
    """A Ray actor's body: one engine that answers chunks of stored requests (made remote by the driver).

    ``slot`` and ``generation`` say which actor this is: its place in the pool and how many died there before.
    Under tensor parallelism it is rank 0 of a group that meets at ``address`` (ray_tp.py); when the group fails
    (another rank died), the actor ends its process before answering, so the driver replaces the whole group and
    runs the chunks it had again.
    """

    def __init__(
        self,
        engine_args: EngineArgs,
        settings: ServerSettings,
        slot: int = 0,
        generation: int = 0,
        address: tuple[str, int] | None = None,
    ) -> None:
        self.slot, self.generation = slot, generation
        if engine_args.tensor_parallel_size > 1:
            if address is None:
                raise ValueError("a tensor-parallel engine needs the address its ranks meet at")
            join_environment(address, 0, engine_args.tensor_parallel_size)
        self._engine = AsyncEngine(build_engine(engine_args))
        self._engine.start()
        if not self._engine.wait_ready(timeout=ENGINE_START_S):
            raise RuntimeError(f"the engine did not start: {self._engine.load_error}")
        self._executor = RequestExecutor(self._engine, settings, ignore_body_model=True)

    async def ready(self) -> int:
        """The actor's process id, once its engine is loaded."""
        return os.getpid()

    async def run(self, rows: list[PendingRequest]) -> tuple[list[Result], list[str]]:
        """Run a chunk at once: the results, and the custom_ids left unanswered (the engine stopped)."""
        self._exit_if_group_failed()
        outcomes = await asyncio.gather(*(self._one(row) for row in rows))
        self._exit_if_group_failed()  # the requests that ran into the failure were failed, not answered
        results = [r for r in outcomes if r is not None]
        left = [row.custom_id for row, r in zip(rows, outcomes, strict=True) if r is None]
        return results, left

    def _exit_if_group_failed(self) -> None:
        """End this process when a tensor-parallel rank died: the engine cannot run again, and no result of a chunk
        it was running may be returned (the driver, seeing this actor die, runs those requests elsewhere)."""
        if self._engine.fatal_error is not None:
            logger.error("Ray engine %d stops: %s", self.slot, self._engine.fatal_error)
            logging.shutdown()
            os._exit(1)

    async def _one(self, row: PendingRequest) -> Result | None:
        try:
            return await self._executor.execute(row)
        except LeftPending:
            return None
        except Exception as exc:  # a bug: answer the request with a server error rather than lose the chunk
            logger.exception("batch request %r failed unexpectedly", row.custom_id)
            return failed(row.custom_id, "internal_error", f"internal error: {exc}")


@dataclass
class _Slot:
    index: int
    handle: Any = None  # the engine's actor (rank 0 under tensor parallelism)
    generation: int = 0
    outstanding: int = 0  # chunks handed to it and not yet back
    followers: list[Any] = field(default_factory=list)  # ranks 1..N-1 under tensor parallelism
    follows: list[Any] = field(default_factory=list)  # their follow() calls' futures: one ends, the group failed
    placement: Any = None  # the placement group that holds the engine's N bundles


@dataclass
class _Chunk:
    slot: _Slot
    generation: int
    rows: list[PendingRequest]
    ref: Any


class RayCluster:
    """Joins (or starts) Ray and runs the actor pool; :meth:`close` kills the actors and stops what it started."""

    worker_class: type[EngineWorker] = EngineWorker
    follower_class: type[FollowerWorker] = FollowerWorker

    def __init__(self, options: RayOptions, engine_args: EngineArgs, settings: ServerSettings) -> None:
        self.options = options
        self.engine_args = engine_args
        self.settings = settings
        self.ray = import_ray()
        self.slots: list[_Slot] = []
        self.replacements_left = 0
        self._owned = False
        self._remote: Any = None
        self._follower_remote: Any = None
        self._address_remote: Any = None
        self.threads = 1
        self.ranks = engine_args.tensor_parallel_size
        self.gpus = 1 if str(engine_args.device or "").startswith("cuda") else 0  # --device cuda: one GPU per rank

    def connect(self) -> None:
        """Start a local instance (``address`` None) or connect; an already-joined process keeps its cluster."""
        ray = self.ray
        if ray.is_initialized():
            return
        common = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
        if self.options.address is None:
            ray.init(num_cpus=os.cpu_count() or 1, **common)
        else:
            check_address(self.options.address)
            try:
                ray.init(address=self.options.address, **common)
            except ConnectionError as exc:
                raise RayJobError(f"cannot reach the Ray cluster at {self.options.address}: {exc}") from None
        self._owned = True

    async def start(self) -> None:
        """Create the actors and wait until every engine is loaded (RayJobError on failure or timeout)."""
        if self.slots:
            return
        self.connect()
        ray = self.ray
        resources = ray.cluster_resources()
        cpus = int(resources.get("CPU", 1))
        ranks = self.ranks
        actors, threads = actor_shape(cpus, self.options.actors, self.options.threads, ranks)
        shape = f"{actors} actors" if ranks == 1 else f"{actors} engines x {ranks} ranks"
        if actors * ranks * threads > cpus:
            need = actors * ranks * threads
            raise RayJobError(f"{shape} x {threads} threads need {need} CPUs; the cluster has {cpus}")
        gpus = int(resources.get("GPU", 0))
        if self.gpus and actors * ranks > gpus:
            raise RayJobError(f"{shape} need {actors * ranks} GPUs (one each); the cluster has {gpus}")
        self.threads = threads
        self._args = replace(self.engine_args, threads=threads)
        place = {"num_cpus": threads, "num_gpus": self.gpus, "max_restarts": 0}
        self._remote = ray.remote(**place)(self.worker_class)
        if ranks > 1:
            self._follower_remote = ray.remote(**place)(self.follower_class)
            self._address_remote = ray.remote(num_cpus=0)(free_address)
        limit = self.options.max_replacements
        self.replacements_left = 2 * actors if limit is None else limit
        self.slots = [_Slot(i) for i in range(actors)]
        for slot in self.slots:
            self._create(slot)
        ready = [asyncio.wrap_future(slot.handle.ready.remote().future()) for slot in self.slots]
        try:
            await asyncio.wait_for(asyncio.gather(*ready), self.options.start_timeout_s)
        except asyncio.TimeoutError:
            raise RayJobError(
                f"the Ray actors did not start within {self.options.start_timeout_s:.0f} s "
                "(does the cluster have the CPUs and memory they ask for?)"
            ) from None
        except ray.exceptions.RayError as exc:
            raise RayJobError(f"a Ray actor could not start: {_first_line(exc)}") from None

    def _create(self, slot: _Slot) -> None:
        """Start the slot's engine: one actor, or under tensor parallelism its N actors in a new placement group."""
        index, generation = slot.index, slot.generation
        if self.ranks == 1:
            slot.handle = self._remote.remote(self._args, self.settings, index, generation)
            return
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"CPU": float(self.threads), **({"GPU": float(self.gpus)} if self.gpus else {})}
        slot.placement = placement_group([bundle] * self.ranks, strategy="STRICT_PACK")

        def on(rank: int) -> dict:
            strategy = PlacementGroupSchedulingStrategy(slot.placement, placement_group_bundle_index=rank)
            return {"scheduling_strategy": strategy}

        address = self._address_remote.options(**on(0)).remote()  # rank 0's node and a free port there
        slot.handle = self._remote.options(**on(0)).remote(self._args, self.settings, index, generation, address)
        slot.followers = [
            self._follower_remote.options(**on(rank)).remote(self._args, index, generation, rank)
            for rank in range(1, self.ranks)
        ]
        slot.follows = [follower.follow.remote(address).future() for follower in slot.followers]

    def _retire(self, slot: _Slot) -> None:
        """Kill every actor of the slot's engine and free its placement group."""
        for handle in [slot.handle, *slot.followers]:
            if handle is not None:
                with contextlib.suppress(Exception):
                    self.ray.kill(handle, no_restart=True)
        if slot.placement is not None:
            from ray.util.placement_group import remove_placement_group

            with contextlib.suppress(Exception):
                remove_placement_group(slot.placement)
        slot.handle, slot.followers, slot.follows, slot.placement = None, [], [], None

    def live(self) -> list[_Slot]:
        return [s for s in self.slots if s.handle is not None]

    def check_ranks(self) -> None:
        """Replace each engine a follower rank of which ended (its process died, or it saw the group fail). Rank 0
        also ends its process when its group fails; this catches what it has not noticed yet."""
        for slot in self.live():
            for rank, follow in enumerate(slot.follows, start=1):
                if follow.done():
                    why = follow.exception() or RuntimeError(f"rank {rank} stopped: its group failed")
                    self.replace_actor(slot, slot.generation, why)
                    break

    def replace_actor(self, slot: _Slot, generation: int, why: BaseException) -> None:
        """Retire the dead engine of ``slot`` (once per death; all its actors under tensor parallelism) and start
        another in its place while allowed."""
        if slot.generation != generation or slot.handle is None:
            return  # already replaced: another of its chunks reported the same death
        logger.warning("Ray actor %d died (%s)", slot.index, _first_line(why))
        self._retire(slot)
        slot.generation += 1
        slot.outstanding = 0
        if self.replacements_left > 0:
            self.replacements_left -= 1
            self._create(slot)
        if not self.live():
            raise RayJobError("every Ray actor died and no replacement is left; run the same command to resume")

    def close(self) -> None:
        """Kill the actors; shut Ray down when this process started or joined it here."""
        for slot in self.slots:
            self._retire(slot)
        self.slots = []
        if self._owned and self.ray.is_initialized():
            self.ray.shutdown()
        self._owned = False


def _no_local_engine() -> AsyncEngine:
    raise RuntimeError("a Ray batch runs no engine in the driver")


class RayBatchRunner(BatchRunner):
    """A :class:`BatchRunner` whose requests run on Ray actors; the store stays in this process.

    ``on_ready`` is called once the actors are loaded (the CLI starts its clock there). Call :meth:`close` at the
    end: it kills the actors and stops a Ray instance this runner started.
    """

    def __init__(
        self,
        store: Store,
        settings: ServerSettings,
        engine_args: EngineArgs,
        options: RayOptions,
        on_progress: Callable[[int, int], None] | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(store, _no_local_engine, settings, options.max_in_flight, on_progress, ignore_body_model=True)
        if options.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {options.max_attempts}")
        self.options = options
        self.cluster = RayCluster(options, engine_args, settings)
        self.on_ready = on_ready
        self.chunks_per_actor = min(CHUNKS_PER_ACTOR, options.max_in_flight)
        self.chunk_size = options.max_in_flight // self.chunks_per_actor
        self._attempts: dict[str, int] = {}
        self.answered: Counter[int] = Counter()  # requests each actor slot answered, for the log

    def close(self) -> None:
        self.cluster.close()

    async def _process(self, job: Job) -> None:
        """Hand every pending request to the actors and commit what comes back; returns when none is left or on
        cancel (what is still running is dropped and stays pending)."""
        fresh = not self.cluster.slots
        await self.cluster.start()
        if fresh and self.on_ready is not None:
            self.on_ready()
        feed = _Feed(self.store, job.id, self.chunk_size)
        in_flight: dict[asyncio.Future, _Chunk] = {}
        watcher = asyncio.create_task(self._watch_cancel(job.id))
        try:
            while True:
                self.cluster.check_ranks()
                await self._fill(feed, in_flight)
                if not in_flight:
                    break
                done, _ = await asyncio.wait(
                    [*in_flight, watcher], timeout=self.options.stall_timeout_s, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    raise RayJobError(f"no Ray actor answered for {self.options.stall_timeout_s:.0f} s")
                for future in done - {watcher}:
                    await self._settle(job.id, feed, future, in_flight.pop(future))
                if watcher in done:
                    break  # cancelled: what came back is committed, the job is finalized as it stands
            for slot in self.cluster.slots:
                logger.info("Ray actor %d answered %d requests", slot.index, self.answered[slot.index])
        finally:
            watcher.cancel()
            for future, chunk in in_flight.items():
                future.cancel()
                with contextlib.suppress(Exception):
                    self.cluster.ray.cancel(chunk.ref)
            await asyncio.gather(watcher, *in_flight, return_exceptions=True)

    async def _fill(self, feed: _Feed, in_flight: dict[asyncio.Future, _Chunk]) -> None:
        """Give each live actor chunks until it holds ``chunks_per_actor`` or nothing is left to run."""
        for slot in self.cluster.live():
            while slot.handle is not None and slot.outstanding < self.chunks_per_actor:
                rows = await feed.next_chunk()
                if not rows:
                    return
                ref = slot.handle.run.remote(rows)
                slot.outstanding += 1
                in_flight[asyncio.wrap_future(ref.future())] = _Chunk(slot, slot.generation, rows, ref)

    async def _settle(self, job_id: str, feed: _Feed, future: asyncio.Future, chunk: _Chunk) -> None:
        """Commit a returned chunk, or queue its requests again when its actor died."""
        if chunk.slot.generation == chunk.generation:
            chunk.slot.outstanding -= 1
        ray = self.cluster.ray
        try:
            results, left = future.result()
            self.answered[chunk.slot.index] += len(results)
        except ray.exceptions.RayActorError as exc:
            self.cluster.replace_actor(chunk.slot, chunk.generation, exc)
            results, left = [], [row.custom_id for row in chunk.rows]
        except ray.exceptions.RayError as exc:  # the chunk itself raised: a bug, or a worker crash
            logger.warning("a Ray chunk failed: %s", _first_line(exc))
            results, left = [], [row.custom_id for row in chunk.rows]
        if left:
            lost = set(left)
            results = results + self._retry(feed, [row for row in chunk.rows if row.custom_id in lost])
        if results:
            committed = await asyncio.to_thread(self.store.commit_results, job_id, results)
            if committed and self.on_progress is not None:
                self.on_progress(committed, sum(r.completion_tokens for r in results))

    def _retry(self, feed: _Feed, rows: list[PendingRequest]) -> list[Result]:
        """Queue lost requests again (alone); those lost ``max_attempts`` times get an error result instead."""
        given_up = []
        for row in rows:
            tries = self._attempts.get(row.custom_id, 0) + 1
            self._attempts[row.custom_id] = tries
            if tries >= self.options.max_attempts:
                message = f"the worker running this request was lost {tries} times"
                given_up.append(failed(row.custom_id, "internal_error", message))
            else:
                feed.retry.append(row)
        return given_up


class _Feed:
    """Pending requests of a job in input order, a page at a time, with lost requests first (one per chunk)."""

    def __init__(self, store: Store, job_id: str, chunk_size: int) -> None:
        self.store, self.job_id, self.chunk_size = store, job_id, chunk_size
        self.retry: deque[PendingRequest] = deque()
        self._page: deque[PendingRequest] = deque()
        self._after = 0
        self._exhausted = False

    async def next_chunk(self) -> list[PendingRequest]:
        if self.retry:
            return [self.retry.popleft()]
        if not self._page and not self._exhausted:
            rows = await asyncio.to_thread(self.store.pending, self.job_id, self._after, PAGE_SIZE)
            if rows:
                self._after = rows[-1].line_no
                self._page.extend(rows)
            else:
                self._exhausted = True
        return [self._page.popleft() for _ in range(min(self.chunk_size, len(self._page)))]


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
