"""RequestTimer reads the engine's event times: TTFT from FIRST_TOKEN, queue time from SCHEDULED."""

from __future__ import annotations

from falconlm.engine.stats import EngineStats
from falconlm.serving.metrics import RequestTimer, ServerMetrics


def _sample(metrics: ServerMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


def test_timer_uses_the_engine_event_times():
    metrics = ServerMetrics(lambda: EngineStats(num_blocks=4, num_free_blocks=1))
    timer = RequestTimer(metrics, arrival=10.0)
    timer.on_tokens(1, now=15.0, first_token_time=12.0)  # delivered at 15, sampled at 12
    timer.on_tokens(2, now=15.5)
    timer.on_finish("length", scheduled_time=11.0, now=16.0)
    assert _sample(metrics, "falconlm_time_to_first_token_seconds_sum") == 2.0
    assert _sample(metrics, "falconlm_inter_token_latency_seconds_sum") == 0.5
    assert _sample(metrics, "falconlm_inter_token_latency_seconds_count") == 2  # two tokens of a run, 0.25 s each
    assert _sample(metrics, "falconlm_request_queue_time_seconds_sum") == 1.0
    assert _sample(metrics, "falconlm_generation_tokens_total") == 3
    assert _sample(metrics, "falconlm_kv_cache_blocks_in_use") == 3


def test_timer_without_events_falls_back_to_delivery_time():
    metrics = ServerMetrics(lambda: EngineStats())
    timer = RequestTimer(metrics, arrival=1.0)
    timer.on_tokens(1, now=4.0)
    timer.on_finish("stop", scheduled_time=None, now=5.0)
    assert _sample(metrics, "falconlm_time_to_first_token_seconds_sum") == 3.0
    assert _sample(metrics, "falconlm_request_queue_time_seconds_count") == 0.0
