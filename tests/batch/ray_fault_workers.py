"""Ray actor classes that die (or dawdle) on purpose, for tests/batch/test_ray_batch.py (actors import them here).

Those that die do it with ``os._exit``: no exception, no reply, the way a killed or OOM-killed process goes.
"""

from __future__ import annotations

import asyncio
import os

from falconlm.batch.ray_executor import EngineWorker
from falconlm.batch.ray_tp import FollowerWorker
from falconlm.batch.records import PendingRequest, Result

EXIT_AFTER = 5
POISON = "req-07"
SLOW_S = 0.1


class ExitsMidJob(EngineWorker):
    """The first actor (slot 0, before any replacement) dies once it has answered EXIT_AFTER requests."""

    answered = 0

    async def _one(self, row: PendingRequest) -> Result | None:
        result = await super()._one(row)
        self.answered += 1
        if (self.slot, self.generation) == (0, 0) and self.answered >= EXIT_AFTER:
            os._exit(1)
        return result


class DiesOnPoison(EngineWorker):
    """Every actor dies when it is given the POISON request."""

    async def run(self, rows: list[PendingRequest]) -> tuple[list[Result], list[str]]:
        if any(row.custom_id == POISON for row in rows):
            os._exit(1)
        return await super().run(rows)


class Slow(EngineWorker):
    """Takes SLOW_S longer over every chunk, so that a test can act while a job runs."""

    async def run(self, rows: list[PendingRequest]) -> tuple[list[Result], list[str]]:
        await asyncio.sleep(SLOW_S)
        return await super().run(rows)


EXIT_AFTER_FORWARDS = 12


class FollowerExitsMidJob(FollowerWorker):
    """Rank 1 of the first engine (slot 0, before any replacement) dies after following EXIT_AFTER_FORWARDS
    forwards: mid-job, while rank 0 has requests in flight."""

    def follow(self, address: tuple[str, int]) -> int:
        if (self.slot, self.generation, self.rank) == (0, 0, 1):
            from falconlm.engine import tp_follower

            make_runner = tp_follower.follower_runner

            def dying_runner(model, plan):
                runner = make_runner(model, plan)
                run_batch, forwards = runner.run_batch, [0]

                def run_then_maybe_exit(batch):
                    out = run_batch(batch)
                    forwards[0] += 1
                    if forwards[0] >= EXIT_AFTER_FORWARDS:
                        os._exit(1)
                    return out

                runner.run_batch = run_then_maybe_exit
                return runner

            tp_follower.follower_runner = dying_runner  # this actor's process only
        return super().follow(address)
