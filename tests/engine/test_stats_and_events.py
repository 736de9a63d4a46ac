"""Engine.stats() is built by the scheduler and KV manager; the scheduler stamps lifecycle events on requests."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from falconlm import FalconForCausalLM, SamplingParams, Tokenizer
from falconlm.engine.engine import Engine, EngineConfig
from falconlm.engine.kv_cache_manager import KVCacheManager
from falconlm.engine.request import Request, RequestEventType, first_event_time
from falconlm.engine.scheduler import Scheduler
from falconlm.engine.stats import EngineStats


def test_stats_snapshot_is_frozen_and_derives_usage():
    stats = EngineStats(num_blocks=8, num_free_blocks=6)
    assert stats.num_blocks_in_use == 2 and stats.kv_cache_usage == 0.25
    assert EngineStats().kv_cache_usage == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.num_running = 3  # type: ignore[misc]


def test_scheduler_records_queued_scheduled_and_preempted():
    manager = KVCacheManager(num_blocks=3, block_size=4)
    scheduler = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    old = Request("old", [1, 2, 3, 4], params, None, 0.0, 64)
    new = Request("new", [5, 6, 7, 8], params, None, 0.0, 64)
    for request in (old, new):
        scheduler.add_request(request)
    scheduler.schedule()  # both admitted: 2 blocks of 3
    for request in (old, new):
        request.num_computed_tokens = request.num_tokens
        request.append_output_token(9)
    scheduler.schedule()  # each needs a second block: the newest is preempted
    assert [e.type for e in old.events] == [RequestEventType.QUEUED, RequestEventType.SCHEDULED]
    assert [e.type for e in new.events] == [
        RequestEventType.QUEUED,
        RequestEventType.SCHEDULED,
        RequestEventType.PREEMPTED,
    ]
    times = [e.timestamp for e in new.events]
    assert times == sorted(times)
    assert first_event_time(new.events, RequestEventType.SCHEDULED) == times[1]
    assert first_event_time(old.events, RequestEventType.PREEMPTED) is None
    assert scheduler.stats().num_preemptions == 1 and scheduler.stats().num_waiting == 1
    assert manager.stats().num_free_blocks == manager.num_free_blocks


def test_engine_stats_and_events_on_outputs(tiny_checkpoint):
    model = FalconForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    engine = Engine(model, Tokenizer.from_pretrained(tiny_checkpoint), EngineConfig(block_size=4, max_num_seqs=1))
    prompt = list(range(5, 25))
    for rid in ("a", "b"):
        engine.add_request(rid, prompt, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    stats = engine.stats()
    assert (stats.num_waiting, stats.num_running, stats.num_steps, stats.num_blocks_in_use) == (2, 0, 0, 0)
    events: dict[str, list] = {"a": [], "b": []}
    for out in engine.step():
        events[out.request_id] += out.events
    stats = engine.stats()
    assert (stats.num_waiting, stats.num_running, stats.num_steps) == (1, 1, 1) and stats.num_blocks_in_use > 0
    while engine.has_unfinished():
        for out in engine.step():
            events[out.request_id] += out.events
    for rid in ("a", "b"):  # each event goes out once, in order
        assert [e.type for e in events[rid]] == [
            RequestEventType.QUEUED,
            RequestEventType.SCHEDULED,
            RequestEventType.FIRST_TOKEN,
        ]
    b_scheduled = first_event_time(events["b"], RequestEventType.SCHEDULED)
    assert b_scheduled is not None and b_scheduled > first_event_time(events["b"], RequestEventType.QUEUED)
    final = engine.stats()
    assert final.num_blocks_in_use == 0 and final.num_prefix_hit_tokens > 0 and final.num_steps > 1
