"""Every Prometheus object of one app, in one per-app registry (two apps in one process never share
counters). Engine counters are read at scrape time through a custom collector, so the engine thread never
touches prometheus_client; the latency histograms are observed by the routes."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.engine.engine import EngineStats

PREFIX = "qwen3_local"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

EngineStatsSource = Callable[[], EngineStats | None]  # None while the model is loading


class _EngineCollector:
    """Reads EngineStats when Prometheus scrapes; yields only `model_ready 0` while there is no engine."""

    def __init__(self, read_stats: EngineStatsSource) -> None:
        self._read_stats = read_stats

    def collect(self) -> Iterable[Metric]:
        stats = self._read_stats()
        yield GaugeMetricFamily(
            f"{PREFIX}_model_ready", "1 once the model is loaded and the engine runs.", value=int(bool(stats))
        )
        if stats is None:
            return
        gauges = {
            "slots": ("Slots (sequences decoded together).", stats.n_slots),
            "slots_busy": ("Slots holding a running request.", stats.n_slots_busy),
            "requests_waiting": ("Requests waiting for a free slot.", stats.n_requests_waiting),
            "requests_running": ("Requests holding at least one slot.", stats.n_requests_running),
            "prompt_cache_bytes": ("Bytes of sequence state the prompt cache holds in RAM.", stats.prompt_cache_bytes),
            "prompt_cache_budget_bytes": (
                "Most bytes the prompt cache may hold (--prompt-cache-mib).",
                stats.prompt_cache_budget_bytes,
            ),
            "prompt_cache_entries": ("Sequence states the prompt cache holds.", stats.prompt_cache_entries),
            "prompt_cache_stash_seconds_per_mib": (
                "Seconds a stash into the prompt cache takes per MiB on the engine thread (running estimate).",
                stats.stash_seconds_per_mib,
            ),
        }
        for name, (documentation, value) in gauges.items():
            yield GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=value)
        counters = {
            "requests_finished": ("Requests the engine finished.", stats.n_requests_finished),
            "requests_failed": ("Requests the engine failed (decode error, timeout).", stats.n_requests_failed),
            "prompt_tokens": ("Prompt tokens computed (prefill).", stats.n_prompt_tokens_computed),
            "prompt_tokens_cached": ("Prompt tokens reused from a slot's cache.", stats.n_prompt_tokens_cached),
            "generated_tokens": ("Tokens generated.", stats.n_generated_tokens),
            "engine_steps": ("Engine steps (one llama_decode each).", stats.n_steps),
            "decode_errors": ("Failed llama_decode calls.", stats.n_decode_errors),
            "decode_seconds": ("Seconds spent inside engine steps.", stats.seconds_decoding),
            "prompt_cache_hits": (
                "Requests whose prompt prefix was loaded from the prompt cache.",
                stats.n_prompt_cache_hits,
            ),
            "prompt_cache_misses": (
                "Requests that found no prefix to reuse, in a slot or in the prompt cache.",
                stats.n_prompt_cache_misses,
            ),
            "prompt_cache_evictions": (
                "Prompt-cache entries dropped, least recently used first, to make room.",
                stats.n_prompt_cache_evictions,
            ),
            "prompt_cache_stashes_skipped": (
                "Slot states not saved to the prompt cache: larger than it, or too slow to copy while streams run.",
                stats.n_prompt_cache_stashes_skipped,
            ),
        }
        for name, (documentation, count) in counters.items():
            yield CounterMetricFamily(f"{PREFIX}_{name}", documentation, value=count)


class Metrics:
    def __init__(self, read_engine_stats: EngineStatsSource) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests answered, by route, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Seconds from receiving a generation request to its first generated token.",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Seconds between consecutive generated tokens of one choice.",
            buckets=_INTER_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.request_duration = Histogram(
            f"{PREFIX}_generation_duration_seconds",
            "Seconds from receiving a generation request to its last token.",
            ["endpoint"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.stream_errors = Counter(
            f"{PREFIX}_stream_errors",
            "Streams ended by an error event after they had started.",
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(read_engine_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CountRequests:
    """ASGI middleware: counts every HTTP response by route template (never the raw path, whose values are
    unbounded), method and status. Sits outside the catch-all, so it also sees the 500s."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            route_path = getattr(route, "path", None) or "unmatched"
            self.metrics.http_requests.labels(route_path, scope.get("method", ""), str(status)).inc()
