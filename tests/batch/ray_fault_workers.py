"""Ray actor classes that die on purpose, for tests/batch/test_ray_batch.py (the actors import them from here).

Each dies with ``os._exit``: no exception, no reply, the way a killed or OOM-killed process goes.
"""

from __future__ import annotations

import os

from falconlm.batch.ray_executor import EngineWorker
from falconlm.batch.records import PendingRequest, Result

EXIT_AFTER = 5
POISON = "req-07"


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
