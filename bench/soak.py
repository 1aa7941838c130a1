"""Soak benchmark: closed-loop streaming chat clients for a fixed time, looking for what only shows up over
minutes (errors, leaked slots, memory growth, latency creeping up), not for peak speed.

    python -m bench.soak --duration 600 --concurrency 16 --parallel 16 --server-args '--prompt-cache-mib 256' \
        --json soak.json --plot soak.png
    python -m bench.soak --base-url http://127.0.0.1:8000/v1 --server-pid 1234 --duration 600

Without --base-url it starts our server itself (`python -m server`, the default model, --parallel slots,
--ctx-size per slot, plus --server-args) on a free loopback port and stops it afterwards. The prompt cache
is RAM the server fills on purpose (by default half the RAM left, gigabytes, which a soak fills for many
minutes): give it a budget the warm-up fills (--server-args '--prompt-cache-mib 256') so that what the RSS
check sees after warm-up is a leak, not the cache still filling.

`concurrency` clients each send one streaming request after another until --duration has passed; requests
in flight then finish (a request still running --drain-limit seconds later is an error). Requests mix
prompt lengths (1, 4 or 16 prompts of bench/prompts.json in one message), output lengths (16-256 tokens,
`ignore_eos` so each asks for exactly that many) and greedy/sampled decoding, drawn from a seeded
generator by request number, so two runs send the same requests. About --disconnect-fraction of them hang
up after a random number of text chunks (at most half their tokens): those are counted, not errors.
Everything else that is not a complete stream (non-2xx, transport error, an error event, no [DONE], fewer
tokens than asked) is an error.

The server's RSS (psutil, by pid) is sampled every --rss-interval seconds. Verdict: PASS when there were
no errors, the server answers /health at the end, every slot is idle again (where /slots exists), and the
RSS after warm-up is flat: the medians of the post-warm-up start, middle and end segments (each a tenth of
the post-warm-up time, at least three samples wide) lie within --rss-tolerance of each other. Warm-up (the
first --warmup seconds) is excluded because the KV cache pages, the prompt cache and the allocators'
arenas fill during it. The exit code is 0 on PASS, 1 on FAIL, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import random
import shlex
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil

from bench.load import (
    DEFAULT_PROMPTS_PATH,
    ERROR_TEXT_LIMIT,
    LoadError,
    StreamTally,
    apply_sse_line,
    discover_model,
    load_prompts,
    require_loopback,
    write_json,
)
from bench.process import ServerSpec, ServerStartError, exit_on_termination, run_server
from bench.stats import MAX_ERROR_SAMPLES, percentile

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
SOAK_SCHEMA_VERSION = 1

DEFAULT_DURATION_S = 600.0
DEFAULT_CONCURRENCY = 16
DEFAULT_PARALLEL = 16
DEFAULT_CTX_SIZE = 2048  # per slot: the longest request (16 prompts ≈ 200 tokens + 256 out) fits many times
DEFAULT_WARMUP_S = 120.0
DEFAULT_WINDOW_S = 60.0
DEFAULT_RSS_INTERVAL_S = 5.0
DEFAULT_RSS_TOLERANCE = 0.05
DEFAULT_DISCONNECT_FRACTION = 0.10
DEFAULT_DRAIN_LIMIT_S = 120.0
DEFAULT_REQUEST_TIMEOUT_S = 300.0
OUTPUT_LENGTHS = (16, 48, 128, 256)
PROMPT_SIZES = (1, 4, 16)  # prompts.json prompts joined into one message
TEMPERATURES = (0.0, 0.8)
RSS_MIN_SEGMENT_SAMPLES = 3
SLOTS_IDLE_WAIT_S = 15.0

OK, DISCONNECTED, ERROR = "ok", "disconnected", "error"


# --- what is sent ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SoakRequestSpec:
    index: int
    prompt: str
    max_tokens: int
    temperature: float
    seed: int
    # Text chunks to read before hanging up; None: read the stream to its end.
    disconnect_after: int | None


def request_spec(index: int, prompts: Sequence[str], seed: int, disconnect_fraction: float) -> SoakRequestSpec:
    """Request number `index` of a run: a function of (seed, index) only, so runs are repeatable whatever
    order the clients happen to take requests in."""
    rng = random.Random(f"{seed}:{index}")
    n_parts = rng.choice(PROMPT_SIZES)
    first = rng.randrange(len(prompts))
    parts = [prompts[(first + k) % len(prompts)] for k in range(n_parts)]
    if n_parts == 1:
        prompt = parts[0]
    else:
        prompt = "Answer each of these in turn:\n" + "\n".join(f"{k + 1}. {part}" for k, part in enumerate(parts))
    max_tokens = rng.choice(OUTPUT_LENGTHS)
    temperature = rng.choice(TEMPERATURES)
    disconnect = rng.random() < disconnect_fraction
    # At most half the tokens, so the hang-up always lands mid-stream, never after the last token.
    disconnect_after = rng.randint(1, max(1, max_tokens // 2)) if disconnect else None
    return SoakRequestSpec(index, prompt, max_tokens, temperature, rng.randrange(2**31), disconnect_after)


def soak_request_body(model: str, spec: SoakRequestSpec, ignore_eos: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": spec.prompt}],
        "max_tokens": spec.max_tokens,
        "temperature": spec.temperature,
        "seed": spec.seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    return body


# --- what came back ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SoakResult:
    """One request; times in seconds since the run started."""

    index: int
    started_s: float
    finished_s: float
    ttft_s: float | None
    n_output_tokens: int
    max_tokens: int
    outcome: str  # ok | disconnected | error
    error: str | None = None


def classify_stream(
    tally: StreamTally, spec: SoakRequestSpec, hung_up: bool, check_length: bool
) -> tuple[str, str | None]:
    """(outcome, error) of a stream that answered 200; pure, so the rules are tested without a server."""
    if tally.error is not None:
        return ERROR, tally.error
    if hung_up:
        return DISCONNECTED, None
    if not tally.done:
        return ERROR, "stream ended without data: [DONE]"
    if check_length:
        n_tokens = tally.usage_tokens
        if n_tokens is None:
            return ERROR, "stream had no usage chunk (asked for stream_options.include_usage)"
        if n_tokens != spec.max_tokens:
            return ERROR, f"stream ended after {n_tokens} of {spec.max_tokens} tokens despite ignore_eos"
    return OK, None


async def soak_request(
    client: httpx.AsyncClient, base_url: str, model: str, spec: SoakRequestSpec, run_started: float, ignore_eos: bool
) -> SoakResult:
    started = time.perf_counter()
    tally = StreamTally()
    hung_up = False
    status_error: str | None = None
    try:
        async with client.stream(
            "POST", f"{base_url}/chat/completions", json=soak_request_body(model, spec, ignore_eos)
        ) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                status_error = f"HTTP {response.status_code}: {text[:ERROR_TEXT_LIMIT]}"
            else:
                async for line in response.aiter_lines():
                    tally = apply_sse_line(tally, line, time.perf_counter())
                    if tally.error is not None or tally.done:
                        break
                    if spec.disconnect_after is not None and len(tally.token_chunk_times) >= spec.disconnect_after:
                        # Leaving the `async with` with the body unread makes httpx close the connection:
                        # the server sees the client go away mid-stream.
                        hung_up = True
                        break
    except (httpx.HTTPError, httpx.StreamError) as exc:  # StreamError is no HTTPError
        status_error = f"{type(exc).__name__}: {exc}"[:ERROR_TEXT_LIMIT]
    finished = time.perf_counter()
    outcome: str
    error: str | None
    if status_error is not None:
        outcome, error = ERROR, status_error
    else:
        outcome, error = classify_stream(tally, spec, hung_up, check_length=ignore_eos)
    n_tokens = tally.usage_tokens if tally.usage_tokens is not None else len(tally.token_chunk_times)
    return SoakResult(
        index=spec.index,
        started_s=started - run_started,
        finished_s=finished - run_started,
        ttft_s=None if tally.first_token_at is None else tally.first_token_at - started,
        n_output_tokens=n_tokens,
        max_tokens=spec.max_tokens,
        outcome=outcome,
        error=error,
    )


# --- pure summaries ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WindowSummary:
    """Requests that started in [start_s, end_s); tokens/s: output tokens streamed during the window, each
    request's tokens spread evenly over its time from first token to end (what the run has per request)."""

    start_s: float
    end_s: float
    n_requests: int
    n_ok: int
    n_disconnected: int
    n_errors: int
    output_tokens_per_s: float
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def window_summaries(results: Sequence[SoakResult], window_s: float, duration_s: float) -> list[WindowSummary]:
    """One summary per window of the run; TTFT from every request that got a first token (a client that
    hangs up later still measured its first token)."""
    if window_s <= 0:
        raise ValueError(f"window must be positive, got {window_s}")
    n_windows = max(1, math.ceil(duration_s / window_s - 1e-9))

    def window_of(t_s: float) -> int:
        return min(max(int(t_s // window_s), 0), n_windows - 1)

    started: list[list[SoakResult]] = [[] for _ in range(n_windows)]
    streamed_tokens = [0.0] * n_windows
    for result in results:
        started[window_of(result.started_s)].append(result)
        if result.outcome == ERROR or not result.n_output_tokens:
            continue
        first = result.started_s + (result.ttft_s or 0.0)
        span = result.finished_s - first
        for index in range(window_of(first), n_windows):
            low, high = index * window_s, (index + 1) * window_s
            if span <= 0:  # everything arrived at once
                streamed_tokens[index] += result.n_output_tokens if low <= first < high else 0
            else:  # tokens streamed after the run's end (the drain) belong to no window
                overlap = max(0.0, min(high, result.finished_s) - max(low, first))
                streamed_tokens[index] += result.n_output_tokens * overlap / span
    summaries = []
    for index, members in enumerate(started):
        start_s = index * window_s
        end_s = min((index + 1) * window_s, max(duration_s, start_s))
        ttfts = [r.ttft_s for r in members if r.ttft_s is not None and r.outcome != ERROR]
        span = end_s - start_s
        summaries.append(
            WindowSummary(
                start_s=start_s,
                end_s=end_s,
                n_requests=len(members),
                n_ok=sum(1 for r in members if r.outcome == OK),
                n_disconnected=sum(1 for r in members if r.outcome == DISCONNECTED),
                n_errors=sum(1 for r in members if r.outcome == ERROR),
                output_tokens_per_s=streamed_tokens[index] / span if span > 0 else 0.0,
                ttft_p50_ms=_ms(percentile(ttfts, 0.50)),
                ttft_p95_ms=_ms(percentile(ttfts, 0.95)),
            )
        )
    return summaries


@dataclass(frozen=True)
class RssSample:
    t_s: float
    rss_bytes: int


@dataclass(frozen=True)
class RssCheck:
    """RSS after warm-up: the median of the samples around the post-warm-up start, the middle and the end."""

    initial_bytes: int | None  # the first sample, as the load began (before warm-up)
    start_bytes: int | None
    middle_bytes: int | None
    end_bytes: int | None
    peak_bytes: int | None
    spread: float | None  # (largest - smallest) / smallest of start, middle, end
    tolerance: float
    flat: bool
    reason: str


def _segment_median(samples: Sequence[RssSample], centre_s: float, half_width_s: float) -> int:
    inside = [s.rss_bytes for s in samples if abs(s.t_s - centre_s) <= half_width_s]
    if len(inside) < RSS_MIN_SEGMENT_SAMPLES:  # too few in the band: the nearest samples instead
        nearest = sorted(samples, key=lambda s: abs(s.t_s - centre_s))[:RSS_MIN_SEGMENT_SAMPLES]
        inside = [s.rss_bytes for s in nearest]
    return int(statistics.median(inside))


def rss_flatness(samples: Sequence[RssSample], warmup_s: float, tolerance: float) -> RssCheck:
    """Is the RSS flat after warm-up? Medians of segments (a tenth of the post-warm-up time each, at least
    RSS_MIN_SEGMENT_SAMPLES samples) make one unlucky sample (a transient buffer) not decide the verdict,
    while steady growth still moves the end segment away from the start one."""
    ordered = sorted(samples, key=lambda s: s.t_s)
    initial = ordered[0].rss_bytes if ordered else None
    after = [s for s in ordered if s.t_s >= warmup_s]
    peak = max((s.rss_bytes for s in after), default=None)
    if len(after) < 3 * RSS_MIN_SEGMENT_SAMPLES:
        reason = f"only {len(after)} RSS samples after the {warmup_s:g} s warm-up; need {3 * RSS_MIN_SEGMENT_SAMPLES}"
        return RssCheck(initial, None, None, None, peak, None, tolerance, False, reason)
    first_s, last_s = after[0].t_s, after[-1].t_s
    half = (last_s - first_s) / 20  # a segment is a tenth of the post-warm-up span
    start = _segment_median(after, first_s + half, half)
    middle = _segment_median(after, (first_s + last_s) / 2, half)
    end = _segment_median(after, last_s - half, half)
    low, high = min(start, middle, end), max(start, middle, end)
    spread = (high - low) / low if low > 0 else math.inf
    flat = spread <= tolerance
    reason = (
        f"RSS after warm-up: start {mib(start)}, middle {mib(middle)}, end {mib(end)} MiB; "
        f"spread {spread:.1%} {'≤' if flat else '>'} {tolerance:.0%}"
    )
    return RssCheck(initial, start, middle, end, peak, spread, tolerance, flat, reason)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    failures: tuple[str, ...]


def soak_verdict(
    n_requests: int, n_errors: int, rss: RssCheck, healthy_at_end: bool, slots_idle_at_end: bool | None
) -> Verdict:
    """PASS needs every condition; slots_idle_at_end None means the server has no /slots to ask."""
    failures = []
    if n_requests - n_errors <= 0:
        failures.append("no request completed")
    if n_errors:
        failures.append(f"{n_errors} of {n_requests} requests failed")
    if not rss.flat:
        failures.append(rss.reason)
    if not healthy_at_end:
        failures.append("the server did not answer /health with 200 at the end")
    if slots_idle_at_end is False:
        failures.append(f"slots were still busy {SLOTS_IDLE_WAIT_S:g} s after the last request")
    return Verdict(not failures, tuple(failures))


def mib(n_bytes: int | None) -> str:
    return "-" if n_bytes is None else f"{n_bytes / 2**20:.1f}"


# --- the run -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SoakConfig:
    base_url: str
    model: str
    prompts: tuple[str, ...]
    duration_s: float = DEFAULT_DURATION_S
    concurrency: int = DEFAULT_CONCURRENCY
    disconnect_fraction: float = DEFAULT_DISCONNECT_FRACTION
    warmup_s: float = DEFAULT_WARMUP_S
    window_s: float = DEFAULT_WINDOW_S
    rss_interval_s: float = DEFAULT_RSS_INTERVAL_S
    rss_tolerance: float = DEFAULT_RSS_TOLERANCE
    drain_limit_s: float = DEFAULT_DRAIN_LIMIT_S
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    ignore_eos: bool = True
    seed: int = 0


@dataclass(frozen=True)
class SoakReport:
    config: SoakConfig
    server_pid: int | None
    started_at_unix: float
    wall_s: float
    n_requests: int
    n_ok: int
    n_disconnected: int
    n_errors: int
    output_tokens: int
    error_samples: tuple[str, ...]
    windows: tuple[WindowSummary, ...]
    rss_samples: tuple[RssSample, ...]
    rss: RssCheck
    healthy_at_end: bool
    slots_idle_at_end: bool | None
    verdict: Verdict


def origin_of(base_url: str) -> str:
    parts = urlsplit(base_url)
    return f"{parts.scheme}://{parts.netloc}"


def read_rss(pid: int) -> int | None:
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None


async def sample_rss(
    pid: int | None, interval_s: float, run_started: float, stop: asyncio.Event, into: list[RssSample]
) -> None:
    """Sample now, every interval, and once more when stopped (so the end of the run is always covered)."""
    if pid is None:
        return
    while True:
        rss = read_rss(pid)
        if rss is not None:
            into.append(RssSample(time.perf_counter() - run_started, rss))
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval_s)


async def server_health(client: httpx.AsyncClient, origin: str) -> bool:
    try:
        return (await client.get(f"{origin}/health")).status_code == 200
    except httpx.HTTPError:
        return False


async def wait_slots_idle(client: httpx.AsyncClient, origin: str, wait_s: float) -> bool | None:
    """True once every slot is idle, False if some stay busy for wait_s, None without our /slots."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            response = await client.get(f"{origin}/slots")
            slots = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            slots = None
        if not isinstance(slots, list) or not all(isinstance(s, dict) and "state" in s for s in slots):
            return None  # not our server's /slots (llama-server's has no "state")
        if all(s["state"] == "idle" for s in slots):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.25)


async def run_soak(
    config: SoakConfig,
    server_pid: int | None,
    on_window: Callable[[str], None] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> SoakReport:
    """Run the clients for config.duration_s, then drain; never runs longer than duration + drain limit."""
    limits = httpx.Limits(max_connections=config.concurrency + 4, max_keepalive_connections=config.concurrency + 4)
    timeout = httpx.Timeout(config.request_timeout_s, connect=10.0)
    results: list[SoakResult] = []
    in_flight: dict[int, tuple[int, float, int]] = {}  # worker → (request index, started_s, max_tokens)
    counter = itertools.count()
    started_at_unix = time.time()
    run_started = time.perf_counter()
    stop_sampling = asyncio.Event()
    rss_samples: list[RssSample] = []

    def elapsed() -> float:
        return time.perf_counter() - run_started

    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False, transport=transport) as client:

        async def worker(worker_id: int) -> None:
            while elapsed() < config.duration_s:
                spec = request_spec(next(counter), config.prompts, config.seed, config.disconnect_fraction)
                in_flight[worker_id] = (spec.index, elapsed(), spec.max_tokens)
                result = await soak_request(client, config.base_url, config.model, spec, run_started, config.ignore_eos)
                del in_flight[worker_id]
                results.append(result)

        async def reporter() -> None:
            next_report = config.window_s
            while on_window is not None:
                await asyncio.sleep(max(0.0, next_report - elapsed()))
                done = list(results)
                errors = sum(1 for r in done if r.outcome == ERROR)
                ttfts = [
                    r.ttft_s for r in done if r.ttft_s is not None and r.started_s >= next_report - config.window_s
                ]
                p50 = percentile(ttfts, 0.5)
                rss = rss_samples[-1].rss_bytes if rss_samples else None
                on_window(
                    f"t={elapsed():5.0f}s requests={len(done)} errors={errors} in-flight={len(in_flight)} "
                    f"TTFT p50 (last window)={'-' if p50 is None else f'{p50 * 1000:.0f}ms'} RSS={mib(rss)} MiB"
                )
                next_report += config.window_s

        sampler = asyncio.create_task(
            sample_rss(server_pid, config.rss_interval_s, run_started, stop_sampling, rss_samples)
        )
        report_task = asyncio.create_task(reporter())
        workers = [asyncio.create_task(worker(i)) for i in range(config.concurrency)]
        done, pending = await asyncio.wait(workers, timeout=config.duration_s + config.drain_limit_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()  # a bug in the client must not pass for a quiet server
        for index, started_s, max_tokens in in_flight.values():
            hung = f"still running {config.drain_limit_s:g} s after the run's end"
            results.append(SoakResult(index, started_s, elapsed(), None, 0, max_tokens, ERROR, hung))
        report_task.cancel()
        await asyncio.gather(report_task, return_exceptions=True)
        stop_sampling.set()
        await sampler
        wall_s = elapsed()
        origin = origin_of(config.base_url)
        healthy = await server_health(client, origin)
        slots_idle = await wait_slots_idle(client, origin, SLOTS_IDLE_WAIT_S)

    results.sort(key=lambda r: r.started_s)
    if server_pid is None:
        rss = RssCheck(None, None, None, None, None, None, config.rss_tolerance, False, "RSS was not sampled (no pid)")
    else:
        rss = rss_flatness(rss_samples, config.warmup_s, config.rss_tolerance)
    n_errors = sum(1 for r in results if r.outcome == ERROR)
    errors = [r.error for r in results if r.error is not None]
    return SoakReport(
        config=replace(config, prompts=()),  # the prompts file is named on the command line; keep JSON small
        server_pid=server_pid,
        started_at_unix=started_at_unix,
        wall_s=wall_s,
        n_requests=len(results),
        n_ok=sum(1 for r in results if r.outcome == OK),
        n_disconnected=sum(1 for r in results if r.outcome == DISCONNECTED),
        n_errors=n_errors,
        output_tokens=sum(r.n_output_tokens for r in results if r.outcome != ERROR),
        error_samples=tuple(dict.fromkeys(errors))[:MAX_ERROR_SAMPLES],
        windows=tuple(window_summaries(results, config.window_s, config.duration_s)),
        rss_samples=tuple(rss_samples),
        rss=rss,
        healthy_at_end=healthy,
        slots_idle_at_end=slots_idle,
        verdict=soak_verdict(len(results), n_errors, rss, healthy, slots_idle),
    )


# --- output ------------------------------------------------------------------------------------------------
def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}ms"


def format_report(report: SoakReport) -> str:
    lines = [
        f"{'window':>11} {'req':>5} {'ok':>5} {'disc':>5} {'err':>4} {'tok/s':>7} {'TTFT p50':>9} {'p95':>8}",
    ]
    for w in report.windows:
        lines.append(
            f"{f'{w.start_s:.0f}-{w.end_s:.0f}s':>11} {w.n_requests:>5} {w.n_ok:>5} {w.n_disconnected:>5} "
            f"{w.n_errors:>4} {w.output_tokens_per_s:>7.1f} {_fmt_ms(w.ttft_p50_ms):>9} {_fmt_ms(w.ttft_p95_ms):>8}"
        )
    rss = report.rss
    lines += [
        f"requests: {report.n_requests} ({report.n_ok} complete, {report.n_disconnected} deliberate disconnects, "
        f"{report.n_errors} errors), {report.output_tokens} output tokens in {report.wall_s:.0f} s",
        f"RSS (MiB): at start {mib(rss.initial_bytes)}; after the {report.config.warmup_s:g} s warm-up: "
        f"start {mib(rss.start_bytes)}, middle {mib(rss.middle_bytes)}, end {mib(rss.end_bytes)}, "
        f"peak {mib(rss.peak_bytes)}; spread {'-' if rss.spread is None else f'{rss.spread:.1%}'} "
        f"(limit {rss.tolerance:.0%})",
        f"server at the end: /health {'200' if report.healthy_at_end else 'NOT 200'}, slots "
        + {True: "all idle", False: "STILL BUSY", None: "not reported"}[report.slots_idle_at_end],
    ]
    lines += [f"  error: {sample}" for sample in report.error_samples]
    lines.append("verdict: PASS" if report.verdict.passed else "verdict: FAIL")
    lines += [f"  - {failure}" for failure in report.verdict.failures]
    return "\n".join(lines)


def report_json(report: SoakReport) -> dict[str, Any]:
    body = asdict(report)
    body["schema_version"] = SOAK_SCHEMA_VERSION
    return body


def plot_report(report: SoakReport, path: Path) -> None:
    """PNG: TTFT p50/p95 per window, RSS over time (warm-up shaded, the tolerance band around the
    post-warm-up start), and requests/disconnects/errors per window."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    figure, (ttft_axis, rss_axis, count_axis) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    mids = [(w.start_s + w.end_s) / 2 / 60 for w in report.windows]
    nan = float("nan")
    ttft_axis.plot(mids, [nan if w.ttft_p50_ms is None else w.ttft_p50_ms for w in report.windows], "o-", label="p50")
    ttft_axis.plot(mids, [nan if w.ttft_p95_ms is None else w.ttft_p95_ms for w in report.windows], "x--", label="p95")
    ttft_axis.set_ylabel("time to first token (ms)")
    ttft_axis.set_ylim(bottom=0)
    ttft_axis.legend(fontsize=8)
    warmup_min = report.config.warmup_s / 60
    for axis in (ttft_axis, rss_axis, count_axis):
        axis.axvspan(0, warmup_min, color="grey", alpha=0.15)
        axis.grid(True, alpha=0.3)
    rss_axis.plot([s.t_s / 60 for s in report.rss_samples], [s.rss_bytes / 2**20 for s in report.rss_samples], "-")
    if report.rss.start_bytes is not None:
        reference = report.rss.start_bytes / 2**20
        tolerance = report.rss.tolerance
        rss_axis.axhspan(reference * (1 - tolerance), reference * (1 + tolerance), color="green", alpha=0.1)
    rss_axis.set_ylabel("server RSS (MiB)")
    width = report.config.window_s / 60 * 0.8
    ok = [w.n_ok for w in report.windows]
    disc = [w.n_disconnected for w in report.windows]
    count_axis.bar(mids, ok, width=width, label="complete")
    count_axis.bar(mids, disc, width=width, bottom=ok, label="disconnected")
    stacked = [a + b for a, b in zip(ok, disc, strict=True)]
    count_axis.bar(mids, [w.n_errors for w in report.windows], width=width, bottom=stacked, label="errors", color="red")
    count_axis.set_ylabel("requests started")
    count_axis.set_xlabel("minutes (grey: warm-up)")
    count_axis.legend(fontsize=8)
    verdict = "PASS" if report.verdict.passed else "FAIL"
    figure.suptitle(f"soak: {report.config.concurrency} streams, {report.config.duration_s:g} s — {verdict}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --- CLI ---------------------------------------------------------------------------------------------------
def find_listener_pid(base_url: str) -> int | None:
    """The pid listening on the base URL's port (visible for our own user's processes), if psutil can tell."""
    port = urlsplit(base_url).port
    if port is None:
        return None
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.Error:
        return None
    for connection in connections:
        if connection.status == psutil.CONN_LISTEN and connection.laddr and connection.laddr.port == port:
            return connection.pid
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def our_server_spec(args: argparse.Namespace, port: int) -> ServerSpec:
    command = [sys.executable, "-m", "server", "--host", HOST, "--port", str(port)]
    command += ["--parallel", str(args.parallel), "--ctx-size", str(args.ctx_size)]
    if args.model:
        command += ["--model", args.model]
    if args.threads:
        command += ["--threads", str(args.threads)]
    command += shlex.split(args.server_args)
    return ServerSpec(
        name="soak-ours",
        command=tuple(command),
        base_url=f"http://{HOST}:{port}/v1",
        health_url=f"http://{HOST}:{port}/health",
        env=(("PYTHONUNBUFFERED", "1"),),
        cwd=REPO_ROOT,
    )


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--base-url", help="a running server on loopback; default: start ours")
    parser.add_argument("--server-pid", type=int, help="pid whose RSS to sample (default: the port's listener)")
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION_S, help="seconds of load (default 600)")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="streaming clients (16)")
    parser.add_argument("--parallel", type=int, default=DEFAULT_PARALLEL, help="slots of the server we start (16)")
    parser.add_argument("--ctx-size", type=int, default=DEFAULT_CTX_SIZE, help="per-slot context of ours (2048)")
    parser.add_argument("--threads", type=int, help="--threads of the server we start")
    parser.add_argument("--model", help="model: passed to the server we start, sent as `model` (default: its own)")
    parser.add_argument(
        "--server-args", default="", help="more flags for the server we start, e.g. '--prompt-cache-mib 256'"
    )
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS_PATH, help="JSON list of prompts")
    parser.add_argument("--disconnect-fraction", type=float, default=DEFAULT_DISCONNECT_FRACTION)
    parser.add_argument("--warmup", type=float, default=DEFAULT_WARMUP_S, help="seconds left out of the RSS check")
    parser.add_argument("--window", type=float, default=DEFAULT_WINDOW_S, help="seconds per TTFT window (60)")
    parser.add_argument("--rss-interval", type=float, default=DEFAULT_RSS_INTERVAL_S, help="seconds (5)")
    parser.add_argument("--rss-tolerance", type=float, default=DEFAULT_RSS_TOLERANCE, help="fraction (0.05)")
    parser.add_argument("--drain-limit", type=float, default=DEFAULT_DRAIN_LIMIT_S, help="seconds after the end")
    parser.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S, help="seconds")
    parser.add_argument("--no-ignore-eos", action="store_true", help="let requests end at EOS (no length check)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--plot", type=Path, help="write a PNG of TTFT, RSS and requests over time")
    parser.add_argument("--log-dir", type=Path, help="where the started server's log goes (default: temp dir)")
    parser.add_argument("--quiet", action="store_true", help="no progress line per window")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if args.duration <= 0 or args.concurrency < 1 or args.parallel < 1:
        raise LoadError("--duration, --concurrency and --parallel must be positive")
    if not 0.0 <= args.disconnect_fraction <= 1.0:
        raise LoadError(f"--disconnect-fraction must be within [0, 1], got {args.disconnect_fraction}")
    if not 0 <= args.warmup < args.duration:
        raise LoadError(f"--warmup ({args.warmup:g} s) must be shorter than --duration ({args.duration:g} s)")
    if args.window <= 0 or args.rss_interval <= 0 or args.drain_limit <= 0 or args.request_timeout <= 0:
        raise LoadError("--window, --rss-interval, --drain-limit and --request-timeout must be positive")
    if args.rss_tolerance < 0:
        raise LoadError("--rss-tolerance must be >= 0")


async def _soak_against(args: argparse.Namespace, base_url: str, pid: int | None) -> SoakReport:
    model = args.model or await discover_model(base_url)
    config = SoakConfig(
        base_url=base_url,
        model=model,
        prompts=load_prompts(args.prompts),
        duration_s=args.duration,
        concurrency=args.concurrency,
        disconnect_fraction=args.disconnect_fraction,
        warmup_s=args.warmup,
        window_s=args.window,
        rss_interval_s=args.rss_interval,
        rss_tolerance=args.rss_tolerance,
        drain_limit_s=args.drain_limit,
        request_timeout_s=args.request_timeout,
        ignore_eos=not args.no_ignore_eos,
        seed=args.seed,
    )

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    return await run_soak(config, pid, on_window=None if args.quiet else progress)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        check_args(args)
        if args.base_url is not None:
            base_url = require_loopback(args.base_url)
            pid = args.server_pid or find_listener_pid(base_url)
            if pid is None:
                print("warning: no server pid found (pass --server-pid); RSS is not sampled", file=sys.stderr)
            report = asyncio.run(_soak_against(args, base_url, pid))
        else:
            exit_on_termination()  # a SIGTERM unwinds run_server, which stops the server it started
            spec = our_server_spec(args, free_port())
            print(f"starting {' '.join(spec.command)}", file=sys.stderr, flush=True)
            with run_server(spec, log_dir=args.log_dir) as server:
                print(f"server pid {server.process.pid}, log {server.log_path}", file=sys.stderr, flush=True)
                report = asyncio.run(_soak_against(args, spec.base_url, server.process.pid))
    except (LoadError, ServerStartError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(format_report(report))
    if args.json is not None:
        write_json(args.json, report_json(report))
    if args.plot is not None:
        plot_report(report, args.plot)
    return 0 if report.verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
