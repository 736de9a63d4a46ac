"""AsyncEngine with n > 1: one request streams its child sequences; aborting the parent id ends them all."""

from __future__ import annotations

import asyncio
import time

from falconlm.engine.async_engine import AsyncEngine
from falconlm.engine.request import RequestEventType
from falconlm.engine.sampling_params import SamplingParams


def test_children_stream_with_their_index_and_events(engine: AsyncEngine):
    params = SamplingParams(n=3, max_tokens=4, seed=1, temperature=1.0, ignore_eos=True)

    async def run():
        stream = await engine.add([("p", [5, 6, 7, 8, 9], params)])
        assert stream.request_ids == ["p-0", "p-1", "p-2"]
        seen: dict[str, list] = {}
        async with stream:
            async for out in stream:
                seen.setdefault(out.request_id, []).append(out)
        return seen

    seen = asyncio.run(run())
    assert sorted(seen) == ["p-0", "p-1", "p-2"]
    for i in range(3):
        outs = seen[f"p-{i}"]
        assert all(o.parent_id == "p" and o.output.index == i for o in outs)
        assert sum(len(o.token_ids) for o in outs) == 4 and outs[-1].finished
        assert [e.type for o in outs for e in o.events][:2] == [RequestEventType.QUEUED, RequestEventType.SCHEDULED]


def test_abort_by_parent_id_ends_every_child(engine: AsyncEngine):
    params = SamplingParams(n=2, max_tokens=100, ignore_eos=True)

    async def run():
        stream = await engine.add([("q", list(range(5, 15)), params)])
        first = await stream.__anext__()
        engine.abort("q")
        rest = [out async for out in stream]
        return [first, *rest]

    outs = asyncio.run(run())
    finals = {o.request_id: o.output.finish_reason for o in outs if o.finished}
    assert finals == {"q-0": "abort", "q-1": "abort"}
    deadline = time.monotonic() + 5
    while engine.stats.num_blocks_in_use or engine.stats.num_running:
        assert time.monotonic() < deadline, engine.stats
        time.sleep(0.01)
