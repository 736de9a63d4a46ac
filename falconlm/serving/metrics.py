"""Prometheus metrics on a private registry, all named ``falconlm_*``.

Latency histograms and token counters are fed by the serving classes as outputs arrive (:class:`RequestTimer`); the
engine's load (running and waiting requests, KV blocks, prefix-cache hits) is read from the engine's
stats snapshot at scrape time; the queue time from the SCHEDULED event recorded on each request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..engine.stats import EngineStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5, 5)


class _EngineCollector:
    """Gauges and counters read from the engine's latest stats at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        yield GaugeMetricFamily("falconlm_num_requests_running", "Requests in the running batch.", s.num_running)
        yield GaugeMetricFamily("falconlm_num_requests_waiting", "Requests in the waiting queue.", s.num_waiting)
        yield GaugeMetricFamily(
            "falconlm_kv_cache_blocks_in_use", "KV-cache blocks held by requests.", s.num_blocks_in_use
        )
        yield GaugeMetricFamily("falconlm_kv_cache_blocks_total", "KV-cache blocks in the pool.", s.num_blocks)
        yield GaugeMetricFamily(
            "falconlm_kv_cache_usage_ratio", "Share of KV-cache blocks in use (0-1).", s.kv_cache_usage
        )
        yield CounterMetricFamily(
            "falconlm_prefix_cache_queries_tokens",
            "Prompt tokens looked up in the prefix cache.",
            s.num_prefix_query_tokens,
        )
        yield CounterMetricFamily(
            "falconlm_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.", s.num_prefix_hit_tokens
        )
        yield GaugeMetricFamily(
            "falconlm_prefix_cache_enabled",
            "1 when the prefix cache is on; 0 when off (by setting, or for recurrent-state models).",
            1 if s.prefix_cache_enabled else 0,
        )
        if s.num_state_slots:  # models with Mamba layers: a recurrent-state slot per running sequence
            yield GaugeMetricFamily(
                "falconlm_state_slots_in_use", "Recurrent-state slots held by requests.", s.num_state_slots_in_use
            )
            yield GaugeMetricFamily("falconlm_state_slots_total", "Recurrent-state slots.", s.num_state_slots)
        yield CounterMetricFamily(
            "falconlm_num_preemptions", "Requests preempted for lack of KV blocks.", s.num_preemptions
        )


class ServerMetrics:
    """The server's metrics; ``render()`` gives the Prometheus text exposition."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.registry = registry = CollectorRegistry()
        self.time_to_first_token = Histogram(
            "falconlm_time_to_first_token_seconds",
            "From arrival to the first generated token.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            "falconlm_inter_token_latency_seconds",
            "Between consecutive generated tokens of a request.",
            buckets=_TOKEN_LATENCY_BUCKETS,
            registry=registry,
        )
        self.e2e_request_latency = Histogram(
            "falconlm_e2e_request_latency_seconds",
            "From arrival to the last token.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.request_queue_time = Histogram(
            "falconlm_request_queue_time_seconds",
            "From arrival until first scheduled.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter("falconlm_prompt_tokens", "Prompt tokens of accepted requests.", registry=registry)
        self.generation_tokens = Counter("falconlm_generation_tokens", "Generated tokens.", registry=registry)
        self.requests = Counter(
            "falconlm_requests", "Finished engine requests by finish reason.", ["finish_reason"], registry=registry
        )
        self.aborted_requests = Counter(
            "falconlm_aborted_requests",
            "Engine requests stopped before they finished (client disconnects, cancels, shutdown).",
            registry=registry,
        )
        self.embedding_requests = Counter(
            "falconlm_embedding_requests", "Accepted /v1/embeddings requests.", registry=registry
        )
        self.embedding_prompt_tokens = Counter(
            "falconlm_embedding_prompt_tokens", "Input tokens of accepted embedding requests.", registry=registry
        )
        registry.register(_EngineCollector(stats))

    def render(self) -> tuple[bytes, str]:
        """(body, content type) for ``GET /metrics``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """Latencies of one engine request (one choice), fed with each output; ``arrival`` is a monotonic time."""

    def __init__(self, metrics: ServerMetrics, arrival: float) -> None:
        self.metrics = metrics
        self.arrival = arrival
        self.last_token_time: float | None = None

    def on_tokens(self, num_tokens: int, now: float, first_token_time: float | None = None) -> None:
        """``num_tokens`` arrived ``now``; ``first_token_time``: when the engine sampled the first token (its
        FIRST_TOKEN event), else ``now``."""
        if num_tokens <= 0:
            return
        m = self.metrics
        if self.last_token_time is None:
            m.time_to_first_token.observe((now if first_token_time is None else first_token_time) - self.arrival)
        else:  # a decode run's tokens arrive together: the gap is spread over them, one observation a token
            gap = (now - self.last_token_time) / num_tokens
            for _ in range(num_tokens):
                m.inter_token_latency.observe(gap)
        self.last_token_time = now
        m.generation_tokens.inc(num_tokens)

    def on_finish(self, finish_reason: str | None, scheduled_time: float | None, now: float) -> None:
        m = self.metrics
        m.e2e_request_latency.observe(now - self.arrival)
        if scheduled_time is not None:
            m.request_queue_time.observe(max(0.0, scheduled_time - self.arrival))
        m.requests.labels(finish_reason=finish_reason or "unknown").inc()

    def on_abort(self) -> None:
        """The request was stopped before it finished (client gone, cancelled, shut down)."""
        self.metrics.requests.labels(finish_reason="abort").inc()
        self.metrics.aborted_requests.inc()
