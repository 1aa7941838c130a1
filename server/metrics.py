"""Every Prometheus object of one app, in one per-app registry (two apps in one process never share
counters). Engine counters, the hardware and the load plan are read at scrape time through custom collectors,
so the engine thread never touches prometheus_client and nothing polls on a timer; the per-request histograms
are observed by the routes.

Request metrics carry vLLM's names under our namespace (`vllm:X` is `qwen3_local:X`, same type, unit, suffixes
and `model_name` label), so a vLLM dashboard maps over by renaming the prefix. The server's own metrics keep
the `qwen3_local_` prefix."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.engine.engine import EngineStats
from server.engine.request import FinishReason

PREFIX = "qwen3_local"
VLLM = "qwen3_local:"  # the namespace of the vLLM-named request metrics
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets, so its dashboards' quantiles read the same
_TTFT_BUCKETS: tuple[float, ...] = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
_INTER_TOKEN_BUCKETS: tuple[float, ...] = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_REQUEST_BUCKETS: tuple[float, ...] = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

EngineStatsSource = Callable[[], EngineStats | None]  # None while the model is loading
LoadReportSource = Callable[[], Mapping[str, Any] | None]  # GET /plan's data; None while loading

# vLLM's finished_reason values: stop, length, abort (the client left, a timeout), error
_FINISHED_REASON = {
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.CANCELLED: "abort",
    FinishReason.TIMEOUT: "abort",
    FinishReason.ERROR: "error",
}


@dataclass(frozen=True)
class FinishedRequest:
    """One engine request as the route saw it end (all its choices), for the per-request metrics."""

    finish_reason: FinishReason  # CANCELLED when the reader left before every choice finished
    n_prompt_tokens: int
    n_generation_tokens: int  # over all its choices
    queue_seconds: float | None = None
    prefill_seconds: float | None = None
    decode_seconds: float | None = None


@dataclass(frozen=True)
class ModelReading:
    """One served model at scrape time: its engine's stats (None while not loaded) and its load report."""

    model: str
    stats: EngineStats | None
    load_report: Mapping[str, Any] | None = None


ModelsSource = Callable[[], Sequence[ModelReading]]


def _with_model(labelled: bool, labels: Sequence[str] = ()) -> list[str]:
    """A family's labels: with several models every per-model series also carries `model`."""
    return [*labels, "model"] if labelled else list(labels)


class _EngineCollector:
    """Reads every model's EngineStats when Prometheus scrapes; a model without an engine (loading, unloaded)
    yields only `model_ready 0`. With one model the series carry no `model` label (as they always did); with
    several, each carries its model's id."""

    def __init__(self, read_models: ModelsSource, labelled: bool) -> None:
        self._read_models = read_models
        self._labelled = labelled

    def collect(self) -> Iterable[Metric]:
        readings = list(self._read_models())
        labelled = self._labelled
        ready = GaugeMetricFamily(
            f"{PREFIX}_model_ready", "1 once the model is loaded and the engine runs.", labels=_with_model(labelled)
        )
        for reading in readings:
            ready.add_metric([reading.model] if labelled else [], int(bool(reading.stats)))
        yield ready
        yield from self._vllm_families(readings)
        loaded = [reading for reading in readings if reading.stats is not None]
        if loaded:
            yield from self._own_families(loaded, labelled)

    @staticmethod
    def _vllm_families(readings: Sequence[ModelReading]) -> Iterable[Metric]:
        """vLLM's engine-level names; declared (without samples) while loading, so the names always exist."""
        gauges = {
            "num_requests_running": ("Requests holding at least one slot.", lambda s: s.n_requests_running),
            "num_requests_waiting": ("Requests waiting for a free slot.", lambda s: s.n_requests_waiting),
            "kv_cache_usage_perc": (
                "KV-cache usage: tokens the slots hold over tokens they can hold. 1 means 100 percent usage.",
                lambda s: s.kv_cache_usage,
            ),
        }
        counters = {
            "prompt_tokens": (
                "Prompt tokens of admitted requests, computed or reused.",
                lambda s: s.n_prompt_tokens_computed + s.n_prompt_tokens_cached,
            ),
            "generation_tokens": ("Tokens generated.", lambda s: s.n_generated_tokens),
            "prefix_cache_queries": (
                "Prompt tokens looked up for reuse (a slot's KV or the prompt cache).",
                lambda s: s.n_prompt_tokens_computed + s.n_prompt_tokens_cached,
            ),
            "prefix_cache_hits": ("Prompt tokens reused instead of computed.", lambda s: s.n_prompt_tokens_cached),
        }
        families: list[tuple[Callable[..., Any], dict[str, tuple[str, Callable[[EngineStats], float]]]]] = [
            (GaugeMetricFamily, gauges),
            (CounterMetricFamily, counters),
        ]
        for family_type, table in families:
            for name, (documentation, read) in table.items():
                family = family_type(f"{VLLM}{name}", documentation, labels=["model_name"])
                for reading in readings:
                    if reading.stats is not None:
                        family.add_metric([reading.model], read(reading.stats))
                yield family

    @staticmethod
    def _own_families(readings: Sequence[ModelReading], labelled: bool) -> Iterable[Metric]:
        def gauges(stats: EngineStats) -> dict[str, tuple[str, float]]:
            return {
                "slots": ("Slots (sequences decoded together).", stats.n_slots),
                "slots_busy": ("Slots holding a running request.", stats.n_slots_busy),
                "prompt_cache_bytes": (
                    "Bytes of sequence state the prompt cache holds in RAM.",
                    stats.prompt_cache_bytes,
                ),
                "prompt_cache_budget_bytes": (
                    "Most bytes the prompt cache may hold (--prompt-cache-mib).",
                    stats.prompt_cache_budget_bytes,
                ),
                "prompt_cache_entries": ("Sequence states the prompt cache holds.", stats.prompt_cache_entries),
                "prompt_cache_stash_seconds_per_mib": (
                    "Seconds a stash into the prompt cache takes per MiB on the engine thread (running estimate).",
                    stats.stash_seconds_per_mib,
                ),
                # measured, beside the plan's predicted_decode_tokens_per_second: the plan is checked by use
                "decode_tokens_per_second": (
                    "Tokens generated per second the engine spent in its steps (since start).",
                    stats.n_generated_tokens / stats.seconds_decoding if stats.seconds_decoding > 0 else 0.0,
                ),
                "spec_acceptance_rate": (
                    "Speculative decoding: accepted / drafted tokens since start (0 before any draft).",
                    stats.n_draft_accepted / stats.n_draft_tokens if stats.n_draft_tokens else 0.0,
                ),
            }

        def counters(stats: EngineStats) -> dict[str, tuple[str, float]]:
            return {
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
                "spec_draft_tokens": ("Speculative decoding: tokens drafted and verified.", stats.n_draft_tokens),
                "spec_accepted_tokens": (
                    "Speculative decoding: drafted tokens accepted (each saved a decode step).",
                    stats.n_draft_accepted,
                ),
            }

        tables: list[tuple[Callable[..., Any], Callable[[EngineStats], dict[str, tuple[str, float]]]]] = [
            (GaugeMetricFamily, gauges),
            (CounterMetricFamily, counters),
        ]
        for family_type, table in tables:
            families: dict[str, Any] = {}
            for reading in readings:
                assert reading.stats is not None
                for name, (documentation, value) in table(reading.stats).items():
                    if name not in families:
                        families[name] = family_type(f"{PREFIX}_{name}", documentation, labels=_with_model(labelled))
                    families[name].add_metric([reading.model] if labelled else [], value)
            yield from families.values()


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    memory_used_bytes: int
    memory_total_bytes: int
    utilization_ratio: float | None  # None: this GPU or driver does not report it
    temperature_celsius: float | None
    power_watts: float | None


class Nvml:
    """NVML, initialised once per app on first use. No NVIDIA driver or library → no GPUs, never an error."""

    def __init__(self) -> None:
        self._pynvml: Any = None
        self._tried = False

    def gpus(self) -> list[GpuReading]:
        pynvml = self._library()
        if pynvml is None:
            return []
        try:
            return [_read_gpu(pynvml, index) for index in range(pynvml.nvmlDeviceGetCount())]
        except pynvml.NVMLError:  # the driver went away (GPU lost, reset): report no GPUs this scrape
            return []

    def _library(self) -> Any:
        if not self._tried:
            self._tried = True
            try:
                import pynvml

                pynvml.nvmlInit()
            except Exception:  # ImportError, NVMLError_LibraryNotFound / DriverNotLoaded: a machine without GPUs
                return None
            self._pynvml = pynvml
        return self._pynvml


def _optional(pynvml: Any, read: Callable[[], float]) -> float | None:
    try:
        return read()
    except pynvml.NVMLError:  # NotSupported on this GPU (power on some boards, utilisation under MIG)
        return None


def _read_gpu(pynvml: Any, index: int) -> GpuReading:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    name = pynvml.nvmlDeviceGetName(handle)
    return GpuReading(
        index=index,
        name=name.decode() if isinstance(name, bytes) else str(name),
        memory_used_bytes=int(memory.used),
        memory_total_bytes=int(memory.total),
        utilization_ratio=_optional(pynvml, lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100),
        temperature_celsius=_optional(
            pynvml, lambda: float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))
        ),
        power_watts=_optional(pynvml, lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000),
    )


GpuSource = Callable[[], Sequence[GpuReading]]


class _HardwareCollector:
    """GPUs (NVML), host RAM and this process's RSS (psutil), read when Prometheus scrapes. Every family is
    declared even with no sample (no GPU), so dashboards and alerts always find their names."""

    def __init__(self, read_gpus: GpuSource) -> None:
        self._read_gpus = read_gpus
        self._process = psutil.Process()

    def collect(self) -> Iterable[Metric]:
        yield from self._gpu_families(self._read_gpus())
        memory = psutil.virtual_memory()
        host = {
            "host_memory_total_bytes": ("Host RAM.", memory.total),
            "host_memory_used_bytes": ("Host RAM in use (total minus available).", memory.total - memory.available),
            "host_memory_available_bytes": ("Host RAM available to new allocations.", memory.available),
            "process_resident_memory_bytes": (
                "Resident memory of the server process.",
                self._process.memory_info().rss,
            ),
        }
        for name, (documentation, value) in host.items():
            yield GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=value)

    @staticmethod
    def _gpu_families(gpus: Sequence[GpuReading]) -> Iterable[Metric]:
        fields: dict[str, tuple[str, Callable[[GpuReading], float | None]]] = {
            "gpu_memory_used_bytes": ("GPU memory in use (all processes).", lambda g: g.memory_used_bytes),
            "gpu_memory_total_bytes": ("GPU memory.", lambda g: g.memory_total_bytes),
            "gpu_utilization_ratio": (
                "Share of the last sample period a kernel ran (0..1).",
                lambda g: g.utilization_ratio,
            ),
            "gpu_temperature_celsius": ("GPU core temperature.", lambda g: g.temperature_celsius),
            "gpu_power_watts": ("GPU board power draw.", lambda g: g.power_watts),
        }
        for name, (documentation, read) in fields.items():
            family = GaugeMetricFamily(f"{PREFIX}_{name}", documentation, labels=["gpu", "name"])
            for gpu in gpus:
                value = read(gpu)
                if value is not None:
                    family.add_metric([str(gpu.index), gpu.name], value)
            yield family


class _PlanCollector:
    """The --auto-offload plan's placement (GET /plan's `plan`) as gauges, per model when several are served;
    declared without samples when the model was loaded without a plan."""

    def __init__(self, read_models: ModelsSource, labelled: bool) -> None:
        self._read_models = read_models
        self._labelled = labelled

    def collect(self) -> Iterable[Metric]:
        labelled = self._labelled
        layers = GaugeMetricFamily(
            f"{PREFIX}_plan_layers",
            "Repeating layers whose non-expert weights the plan puts on a device.",
            labels=_with_model(labelled, ["device"]),
        )
        expert_layers = GaugeMetricFamily(
            f"{PREFIX}_plan_expert_layers",
            "Layers whose routed experts the plan puts on a device.",
            labels=_with_model(labelled, ["device"]),
        )
        device_bytes = GaugeMetricFamily(
            f"{PREFIX}_plan_device_bytes",
            "Bytes the plan places on a device, by use (weights, kv, recurrent, compute, overhead, total, budget).",
            labels=_with_model(labelled, ["device", "use"]),
        )
        predicted = GaugeMetricFamily(
            f"{PREFIX}_plan_predicted_decode_tokens_per_second",
            "Decode tokens/s the plan predicts with every slot generating.",
            labels=["model_name"],
        )
        for reading in self._read_models():
            plan = (reading.load_report or {}).get("plan") or {}
            model = [reading.model] if labelled else []
            for device in plan.get("devices", []):
                name = device["name"]
                layers.add_metric([name, *model], sum(1 for layer in plan.get("layers", []) if layer["device"] == name))
                expert_layers.add_metric(
                    [name, *model], sum(1 for layer in plan.get("layers", []) if layer["experts_device"] == name)
                )
                for use in ("weights", "kv", "recurrent", "compute", "overhead", "total", "budget"):
                    device_bytes.add_metric([name, use, *model], device[f"{use}_bytes"])
            if "predicted" in plan:
                predicted.add_metric([reading.model], plan["predicted"]["decode_tokens_per_s"])
        yield from (layers, expert_layers, device_bytes, predicted)


# (bytes spooled now, most bytes the spool may hold), or None when auditing is off
AuditSpoolSource = Callable[[], tuple[int, int] | None]


class _AuditSpoolCollector:
    """The audit spool (records waiting for an unreachable database): how full it is, read on scrape; declared
    without samples when auditing is off. deploy/prometheus/alerts.yml warns before it fills, because a full
    spool makes the server refuse requests (--audit-required)."""

    def __init__(self, read_spool: AuditSpoolSource) -> None:
        self._read_spool = read_spool

    def collect(self) -> Iterable[Metric]:
        spooled = GaugeMetricFamily(
            f"{PREFIX}_audit_spool_bytes", "Bytes of audit records spooled while the audit database is unreachable."
        )
        capacity = GaugeMetricFamily(
            f"{PREFIX}_audit_spool_capacity_bytes", "Most bytes the audit spool may hold (--audit-spool-mib)."
        )
        reading = self._read_spool()
        if reading is not None:
            spooled.add_metric([], reading[0])
            capacity.add_metric([], reading[1])
        yield from (spooled, capacity)


class Metrics:
    def __init__(
        self,
        read_engine_stats: EngineStatsSource,
        model_name: str = "",
        read_load_report: LoadReportSource = lambda: None,
        read_gpus: GpuSource | None = None,
        read_audit_spool: AuditSpoolSource = lambda: None,
        read_models: ModelsSource | None = None,
    ) -> None:
        """One model: `read_engine_stats` and `read_load_report` are its; several: `read_models` reads them all
        (and every per-model series gets a `model` label). `model_name` labels the per-request metrics; each
        model's routes book through `for_model(id)`."""
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests answered, by route, method and status code.",
            ["route", "method", "status"],
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
        self._add_vllm_request_metrics()
        labelled = read_models is not None
        models = read_models or (lambda: [ModelReading(model_name, read_engine_stats(), read_load_report())])
        self.registry.register(_EngineCollector(models, labelled))
        self.registry.register(_HardwareCollector(read_gpus or Nvml().gpus))
        self.registry.register(_PlanCollector(models, labelled))
        self.registry.register(_AuditSpoolCollector(read_audit_spool))

    def _add_vllm_request_metrics(self) -> None:
        def histogram(name: str, documentation: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(f"{VLLM}{name}", documentation, ["model_name"], buckets=buckets, registry=self.registry)

        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Seconds from receiving a request to its first token.", _TTFT_BUCKETS
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Seconds between consecutive tokens of one choice.", _INTER_TOKEN_BUCKETS
        )
        self.e2e_latency = histogram(
            "e2e_request_latency_seconds", "Seconds from receiving a request to its last token.", _REQUEST_BUCKETS
        )
        self.queue_time = histogram(
            "request_queue_time_seconds", "Seconds a request waited for a slot.", _REQUEST_BUCKETS
        )
        self.prefill_time = histogram(
            "request_prefill_time_seconds", "Seconds from getting a slot to the first token.", _REQUEST_BUCKETS
        )
        self.decode_time = histogram(
            "request_decode_time_seconds", "Seconds from the first token to the last.", _REQUEST_BUCKETS
        )
        self.prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens per request.", _TOKEN_BUCKETS)
        self.generation_tokens = histogram(
            "request_generation_tokens", "Generated tokens per request (all its choices).", _TOKEN_BUCKETS
        )
        self.request_success = Counter(
            f"{VLLM}request_success",
            "Requests finished, by finished_reason (stop, length, abort, error).",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )

    def request_finished(self, request: FinishedRequest) -> None:
        """Book one engine request that ended: vLLM's per-request histograms and its success counter."""
        model = self.model_name
        self.request_success.labels(model, _FINISHED_REASON[request.finish_reason]).inc()
        self.prompt_tokens.labels(model).observe(request.n_prompt_tokens)
        self.generation_tokens.labels(model).observe(request.n_generation_tokens)
        phases = (
            (self.queue_time, request.queue_seconds),
            (self.prefill_time, request.prefill_seconds),
            (self.decode_time, request.decode_seconds),
        )
        for histogram, seconds in phases:
            if seconds is not None:
                histogram.labels(model).observe(seconds)

    def for_model(self, model_name: str) -> Metrics:
        """These metrics (the same registry and series) booking per-request observations under `model_name`."""
        if model_name == self.model_name:
            return self
        view = copy.copy(self)
        view.model_name = model_name
        return view

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
