"""Small JSON endpoints for the web UI (server/ui): who the caller is, and a dashboard snapshot.

`GET /ui/api/whoami` authenticates like every other route but needs no scope: the UI asks it which scopes a
key has (to show or hide the admin pages). `GET /ui/api/stats` (`admin`) is the dashboard's 1 s poll: engine
numbers, latency quantiles over the last minute and the hardware, read from the engine's stats and the app's
Prometheus registry (server/metrics.py) — nothing new is measured. Each poll takes one reading; readings at
least a second apart go into a ring buffer kept on `app.state` (one per app, no module-level state), from
which the rates, the last minute's quantiles and the charts' history are computed.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import APIRouter, Depends, Request

from server.api.auth import app_auth, require_admin
from server.api.state import ServerState, server_state
from server.fleet.slot import ModelSlot
from server.metrics import PREFIX, VLLM

router = APIRouter(prefix="/ui/api")

SAMPLE_SPACING_S = 0.9  # readings closer together than this (two dashboards open) are not stored twice
KEEP_S = 600.0  # the ring buffer holds the last ten minutes
HISTORY_S = 300.0  # the charts show the last five
QUANTILE_WINDOW_S = 60.0  # TTFT and inter-token latency quantiles: over the last minute
RATE_MIN_SPAN_S = 1.0  # tokens/s: over at least this long

_TTFT = f"{VLLM}time_to_first_token_seconds"
_ITL = f"{VLLM}inter_token_latency_seconds"

Buckets = tuple[tuple[float, float], ...]  # (upper bound, cumulative count), ascending, +Inf last


@dataclass(frozen=True)
class Reading:
    """One look at the server: monotonic time, engine counters and gauges, histograms, hardware."""

    t: float
    ready: bool
    generated_tokens: int = 0
    seconds_decoding: float = 0.0
    slots: int = 0
    slots_busy: int = 0
    queue: int = 0
    running: int = 0
    prompt_cache_hits: int = 0
    prompt_cache_misses: int = 0
    kv_cache_usage: float = 0.0
    ttft: Buckets = ()
    itl: Buckets = ()
    gpus: tuple[dict[str, Any], ...] = ()
    ram: Mapping[str, float] = field(default_factory=dict)


class StatsRing:
    """The dashboard's readings of one app (app.state.ui_stats); touched only on the event loop."""

    def __init__(self) -> None:
        self.readings: deque[Reading] = deque(maxlen=int(KEEP_S / SAMPLE_SPACING_S) + 2)

    def add(self, reading: Reading) -> None:
        if not self.readings or reading.t - self.readings[-1].t >= SAMPLE_SPACING_S:
            self.readings.append(reading)
        while self.readings and reading.t - self.readings[0].t > KEEP_S:
            self.readings.popleft()

    def before(self, reading: Reading, seconds: float) -> Reading | None:
        """The newest stored reading at least `seconds` older than `reading`; else the oldest older one."""
        older = [r for r in self.readings if r.t < reading.t and r.ready]
        spaced = [r for r in older if reading.t - r.t >= seconds]
        if spaced:
            return spaced[-1]
        return older[0] if older else None

    def since(self, reading: Reading, seconds: float) -> Reading | None:
        """The oldest stored ready reading no more than `seconds` older than `reading`."""
        for r in self.readings:
            if r.ready and r.t < reading.t and reading.t - r.t <= seconds:
                return r
        return None


def _ring(request: Request, model: str) -> StatsRing:
    """The model's ring buffer (one per served model, on app.state)."""
    state = request.app.state
    rings: dict[str, StatsRing] | None = getattr(state, "ui_stats", None)
    if rings is None:
        rings = state.ui_stats = {}
    return rings.setdefault(model, StatsRing())


def _families(state: ServerState) -> dict[str, Any]:
    """The registry's families by name, one collect (this is what /metrics renders)."""
    return {family.name: family for family in state.metrics.registry.collect()}


def _buckets(family: Any, model: str | None = None) -> Buckets:
    if family is None:
        return ()
    bounds: dict[float, float] = {}
    for sample in family.samples:
        if model is not None and sample.labels.get("model_name") != model:
            continue
        if sample.name.endswith("_bucket"):
            bound = float(sample.labels["le"])
            bounds[bound] = bounds.get(bound, 0.0) + sample.value  # summed over model_name (there is one)
    return tuple(sorted(bounds.items()))


def _gauge(families: Mapping[str, Any], name: str) -> float | None:
    family = families.get(name)
    if family is None or not family.samples:
        return None
    return float(family.samples[0].value)


def _gpus(families: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    gpus: dict[str, dict[str, Any]] = {}
    fields = {
        "memory_used_bytes": f"{PREFIX}_gpu_memory_used_bytes",
        "memory_total_bytes": f"{PREFIX}_gpu_memory_total_bytes",
        "utilization_ratio": f"{PREFIX}_gpu_utilization_ratio",
    }
    for key, name in fields.items():
        family = families.get(name)
        for sample in family.samples if family is not None else ():
            gpu = gpus.setdefault(
                sample.labels["gpu"],
                {"index": int(sample.labels["gpu"]), "name": sample.labels["name"], "utilization_ratio": None},
            )
            gpu[key] = sample.value
    return tuple(gpus[index] for index in sorted(gpus, key=int))


def take_reading(state: ServerState, now: float | None = None, slot: ModelSlot | None = None) -> Reading:
    """A reading of the model `slot` (default: the default model) and the machine."""
    slot = slot or state.default
    families = _families(state)
    model = slot.id if len(state.fleet.slots) > 1 else None  # one model: every series is its
    ram = {
        "used_bytes": _gauge(families, f"{PREFIX}_host_memory_used_bytes") or 0.0,
        "total_bytes": _gauge(families, f"{PREFIX}_host_memory_total_bytes") or 0.0,
        "process_bytes": _gauge(families, f"{PREFIX}_process_resident_memory_bytes") or 0.0,
    }
    base = Reading(
        t=time.monotonic() if now is None else now,
        ready=False,
        ttft=_buckets(families.get(_TTFT), model),
        itl=_buckets(families.get(_ITL), model),
        gpus=_gpus(families),
        ram=ram,
    )
    stats = slot.engine_stats()
    if stats is None:
        return base
    return replace(
        base,
        ready=True,
        generated_tokens=stats.n_generated_tokens,
        seconds_decoding=stats.seconds_decoding,
        slots=stats.n_slots,
        slots_busy=stats.n_slots_busy,
        queue=stats.n_requests_waiting,
        running=stats.n_requests_running,
        prompt_cache_hits=stats.n_prompt_cache_hits,
        prompt_cache_misses=stats.n_prompt_cache_misses,
        kv_cache_usage=stats.kv_cache_usage,
    )


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus's histogram_quantile over cumulative (upper bound, count) buckets: linear within the bucket;
    None with no observations. A quantile in the +Inf bucket reads as the largest finite bound."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def _delta(now: Buckets, then: Buckets) -> Buckets:
    before = dict(then)
    return tuple((bound, count - before.get(bound, 0.0)) for bound, count in now)


def _quantiles(now: Buckets, then: Reading | None, name: str) -> dict[str, float | None]:
    window = _delta(now, getattr(then, name)) if then is not None else now
    count = window[-1][1] if window else 0.0
    return {
        "p50": histogram_quantile(0.5, window),
        "p95": histogram_quantile(0.95, window),
        "count": int(count),
    }


def _rate(later: Reading, earlier: Reading | None) -> float | None:
    if earlier is None or not earlier.ready or later.t <= earlier.t:
        return None
    return max(0.0, (later.generated_tokens - earlier.generated_tokens) / (later.t - earlier.t))


def _history(readings: Iterable[Reading], now: float) -> list[dict[str, Any]]:
    points: list[dict[str, Any]] = []
    previous: Reading | None = None
    for reading in readings:
        if now - reading.t <= HISTORY_S and reading.ready:
            points.append(
                {
                    "t": round(reading.t - now, 3),
                    "tokens_per_second": _rate(reading, previous),
                    "slots_busy": reading.slots_busy,
                    "queue": reading.queue,
                    "ram_used_bytes": reading.ram.get("used_bytes", 0.0),
                }
            )
        previous = reading
    return points


def snapshot(state: ServerState, ring: StatsRing, reading: Reading, slot: ModelSlot | None = None) -> dict[str, Any]:
    """The dashboard's JSON for this reading (already added to the ring) of the model `slot` (default: the
    default model)."""
    slot = slot or state.default
    minute_ago = ring.since(reading, QUANTILE_WINDOW_S)
    return {
        "status": slot.status,
        "model": slot.id,
        "tokens_per_second": _rate(reading, ring.before(reading, RATE_MIN_SPAN_S)) if reading.ready else None,
        "ttft_seconds": _quantiles(reading.ttft, minute_ago, "ttft"),
        "inter_token_latency_seconds": _quantiles(reading.itl, minute_ago, "itl"),
        "slots": {"total": reading.slots, "busy": reading.slots_busy},
        "requests_running": reading.running,
        "queue": reading.queue,
        "kv_cache_usage": reading.kv_cache_usage,
        "prompt_cache": {"hits": reading.prompt_cache_hits, "misses": reading.prompt_cache_misses},
        "generated_tokens": reading.generated_tokens,
        # what /metrics calls qwen3_local_decode_tokens_per_second: beside the plan's predicted rate
        "decode_tokens_per_second": (
            reading.generated_tokens / reading.seconds_decoding if reading.seconds_decoding > 0 else None
        ),
        "gpus": list(reading.gpus),
        "ram": dict(reading.ram),
        "history": {"seconds": HISTORY_S, "points": _history(ring.readings, reading.t)},
    }


@router.get("/whoami", response_model=None)
async def whoami(request: Request) -> dict[str, Any]:
    """The caller's name and scopes: any valid credential may ask (401 without one when auth is on)."""
    principal = app_auth(request).snapshot.authenticate(request.headers.get("authorization", ""))
    request.state.principal = principal
    return {"name": principal.name, "scopes": sorted(principal.scopes)}


@router.get("/stats", response_model=None, dependencies=[Depends(require_admin)])
async def stats(request: Request, model: str | None = None) -> dict[str, Any]:
    """The dashboard's snapshot of one model (`?model=`, default: the default model): rates and quantiles,
    slots, queue, caches, GPUs and RAM, and the history."""
    state = server_state(request)
    slot = state.model(model)
    ring = _ring(request, slot.id)
    reading = take_reading(state, slot=slot)
    ring.add(reading)
    return snapshot(state, ring, reading, slot)
