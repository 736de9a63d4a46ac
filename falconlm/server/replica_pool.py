"""The replicas behind a front end, and their health checks.

Each :class:`Replica` is a complete falconlm server somewhere (a Ray actor, for ``serve --ray-replicas``). The
front knows it by a ``locate`` callable that returns its base URL, so a replica that restarts on another port or
node is found again. :class:`ReplicaPool` polls every replica's ``/health``: one that answers 200 is routed to;
one that refuses the connection (dead), or fails :data:`FAILURES_TO_DROP` checks in a row (hung, restarting,
loading), is taken out of routing, and comes back in with its next 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

from .replica_routing import choose_replica

logger = logging.getLogger("falconlm.serve")

FAILURES_TO_DROP = 2  # failed checks in a row before a replica that still accepts connections leaves the routing


@dataclass(eq=False)
class Replica:
    """One replica: ``locate()`` blocks at most a few seconds and returns its base URL (or raises)."""

    index: int
    locate: Callable[[], str]
    url: str | None = None
    ready: bool = False
    in_flight: int = 0
    failures: int = 0
    routed: int = 0
    _check_now: asyncio.Event = field(default_factory=asyncio.Event, repr=False)


class ReplicaPool:
    """The replicas, which of them are ready, and the loop that keeps that current."""

    def __init__(
        self,
        locators: Sequence[Callable[[], str]],
        health_interval: float = 2.0,
        health_timeout: float = 5.0,
        route_floor: int = 16,
    ) -> None:
        if not locators:
            raise ValueError("a replica pool needs at least one replica")
        self.replicas = [Replica(index, locate) for index, locate in enumerate(locators)]
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.route_floor = route_floor
        self.headers: dict[str, str] = {}  # sent with every health check (the replicas' key)

    @property
    def ready(self) -> list[Replica]:
        return [replica for replica in self.replicas if replica.ready and replica.url is not None]

    def pick(self, key: bytes | None, exclude: set[int] = frozenset()) -> Replica | None:  # type: ignore[assignment]
        """The ready replica for routing ``key`` (see ``replica_routing``), counted in flight; None if none."""
        loads = {r.index: r.in_flight for r in self.ready if r.index not in exclude}
        if not loads:
            return None
        replica = self.replicas[choose_replica(key, loads, floor=self.route_floor)]
        replica.in_flight += 1
        replica.routed += 1
        return replica

    def release(self, replica: Replica) -> None:
        replica.in_flight -= 1

    def mark_down(self, replica: Replica, reason: str) -> None:
        """Out of routing at once (its connection was refused); the health loop brings it back."""
        if replica.ready:
            logger.warning("replica %d is out of routing: %s", replica.index, reason)
        replica.ready = False
        replica.url = None
        replica._check_now.set()

    def suspect(self, replica: Replica) -> None:
        """Check this replica now rather than at the next interval (a request to it failed)."""
        replica._check_now.set()

    async def run(self, client: httpx.AsyncClient) -> None:
        """Check every replica every ``health_interval`` seconds (sooner when suspected), until cancelled."""
        await asyncio.gather(*(self._watch(replica, client) for replica in self.replicas))

    async def _watch(self, replica: Replica, client: httpx.AsyncClient) -> None:
        while True:
            try:
                await self.check(replica, client)
            except Exception:  # a bug here must not stop the checks of this replica for good
                logger.exception("health check of replica %d failed", replica.index)
            replica._check_now.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(replica._check_now.wait(), self.health_interval)

    async def check(self, replica: Replica, client: httpx.AsyncClient) -> bool:
        """One health check of ``replica``; updates and returns whether it is ready."""
        if replica.url is None:
            try:
                url = await asyncio.wait_for(asyncio.to_thread(replica.locate), self.health_timeout + 1)
            except Exception as exc:
                logger.debug("replica %d is not reachable yet: %s", replica.index, exc)
                return False
            replica.url = url.rstrip("/")
        try:
            response = await client.get(f"{replica.url}/health", headers=self.headers, timeout=self.health_timeout)
            healthy, reason = response.status_code == 200, f"/health answered {response.status_code}"
        except httpx.ConnectError as exc:  # nothing listens there: the replica is gone (Ray restarts it elsewhere)
            self.mark_down(replica, f"connection refused ({exc})")
            return False
        except httpx.TransportError as exc:
            healthy, reason = False, f"/health failed: {type(exc).__name__}"
        if healthy:
            if not replica.ready:
                logger.info("replica %d is ready at %s", replica.index, replica.url)
            replica.ready, replica.failures = True, 0
            return True
        replica.failures += 1
        if replica.failures >= FAILURES_TO_DROP and replica.ready:
            logger.warning("replica %d is out of routing: %s", replica.index, reason)
            replica.ready = False
        return replica.ready
