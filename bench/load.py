"""Load benchmark: N concurrent streaming chat clients against any OpenAI-compatible server on loopback.

    python -m bench.load --base-url http://127.0.0.1:8080/v1 --concurrency 1,4,16 --max-tokens 64 \
        --requests-per-level 64 --json out.json --plot out.png

Per concurrency level, `concurrency` clients each take the next request from a fixed list (prompt i mod
len(prompts), temperature 0, fixed max_tokens) until the level's requests are done: a closed loop, so
the server always has exactly `concurrency` streams in flight except while the level drains. Every
request asks for exactly max_tokens tokens where the server allows it (llama.cpp's `ignore_eos` and
`n_predict` are sent next to the OpenAI fields); the report's mean tokens per request shows whether it did.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from tqdm import tqdm

from bench.sse_client import Connection, Endpoint, read_all, read_lines
from bench.stats import LevelSummary, LoadReport, RequestResult, RunSettings, report_to_json, summarize_level

DEFAULT_PROMPTS_PATH = Path(__file__).resolve().parent / "prompts.json"
DEFAULT_REQUEST_TIMEOUT_S = 300.0
DEFAULT_LEVEL_TIMEOUT_S = 900.0
# Without --requests-per-level each client sends this many requests, so the level spends most of its
# time at full concurrency rather than ramping up and draining.
DEFAULT_REQUESTS_PER_CLIENT = 4
ERROR_TEXT_LIMIT = 300


class LoadError(ValueError):
    """Bad arguments or an unusable server; printed as one line by the CLI."""


@dataclass(frozen=True)
class LoadPlan:
    """Everything one load run sends; the same plan against two servers sends the same requests."""

    base_url: str
    model: str
    prompts: tuple[str, ...]
    max_tokens: int
    concurrency_levels: tuple[int, ...]
    requests_per_level: tuple[int, ...]
    ignore_eos: bool = True
    banned_token_ids: tuple[int, ...] = ()
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    level_timeout_s: float = DEFAULT_LEVEL_TIMEOUT_S
    warmup_requests: int = 1
    # A `response_format` every request carries (a json_schema workload: grammar-constrained decoding). The
    # grammar ends each answer, so such a plan does not ask for ignore_eos.
    response_format: Mapping[str, Any] | None = None
    api_key: str | None = None  # for a server with authentication on


def require_loopback(base_url: str) -> str:
    """Return base_url without a trailing slash; refuse anything but http(s) to a loopback address."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LoadError(f"base URL must look like http://127.0.0.1:PORT/v1, got {base_url!r}")
    host = parts.hostname
    if host != "localhost":
        try:
            is_loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            is_loopback = False
        if not is_loopback:
            raise LoadError(f"only loopback servers may be benchmarked (127.0.0.0/8, ::1, localhost), got {host}")
    return base_url.rstrip("/")


def parse_levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise LoadError(f"--concurrency takes comma-separated integers like 1,4,16, got {text!r}") from None
    if not levels or any(level < 1 for level in levels):
        raise LoadError(f"--concurrency needs at least one level, each >= 1, got {text!r}")
    return levels


def requests_for_levels(levels: Sequence[int], requests_per_level: int | None) -> tuple[int, ...]:
    """A fixed count per level, or by default DEFAULT_REQUESTS_PER_CLIENT per client."""
    if requests_per_level is not None:
        if requests_per_level < 1:
            raise LoadError(f"--requests-per-level must be >= 1, got {requests_per_level}")
        return tuple(requests_per_level for _ in levels)
    return tuple(level * DEFAULT_REQUESTS_PER_CLIENT for level in levels)


def load_prompts(path: Path) -> tuple[str, ...]:
    try:
        body = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LoadError(f"cannot read prompts from {path}: {exc}") from exc
    prompts = body.get("prompts") if isinstance(body, dict) else body
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise LoadError(f"{path} must hold a non-empty list of strings (or an object with one under 'prompts')")
    return tuple(prompts)


def json_schema_format(path: Path) -> dict[str, Any]:
    """A json_schema response_format from a file holding the schema (named after the file)."""
    try:
        schema = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LoadError(f"cannot read a JSON schema from {path}: {exc}") from exc
    if not isinstance(schema, dict):
        raise LoadError(f"{path} must hold a JSON schema object")
    return {"type": "json_schema", "json_schema": {"name": path.stem, "schema": schema, "strict": True}}


def chat_request_body(plan: LoadPlan, prompt: str, send_extras: bool) -> dict[str, Any]:
    """The streaming chat request; `send_extras` adds llama.cpp's ignore_eos/n_predict (not OpenAI fields)."""
    body: dict[str, Any] = {
        "model": plan.model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": plan.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if plan.banned_token_ids:
        body["logit_bias"] = {str(token_id): -100 for token_id in plan.banned_token_ids}
    if plan.response_format is not None:
        body["response_format"] = dict(plan.response_format)
    if send_extras and plan.response_format is None:
        body["ignore_eos"] = True
        body["n_predict"] = plan.max_tokens
    return body


@dataclass(frozen=True)
class StreamTally:
    """What the SSE parser has seen so far in one response."""

    first_token_at: float | None = None
    token_chunk_times: tuple[float, ...] = ()
    usage_tokens: int | None = None
    prompt_tokens: int | None = None
    cached_prompt_tokens: int | None = None
    error: str | None = None
    done: bool = False


def apply_sse_line(tally: StreamTally, line: str, now: float) -> StreamTally:
    """Fold one line of an SSE stream into the tally (pure, so it is testable without a server)."""
    if not line.startswith("data:"):
        return tally
    payload = line[len("data:") :].strip()
    if payload == "[DONE]":
        return replace(tally, done=True)
    try:
        chunk = json.loads(payload)
    except json.JSONDecodeError:
        return replace(tally, error=f"unparseable stream chunk: {payload[:ERROR_TEXT_LIMIT]}")
    if not isinstance(chunk, dict):
        return tally
    if "error" in chunk:
        return replace(tally, error=f"error in stream: {json.dumps(chunk['error'])[:ERROR_TEXT_LIMIT]}")
    usage = chunk.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        tally = replace(tally, usage_tokens=usage["completion_tokens"])
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        tally = replace(
            tally,
            prompt_tokens=usage["prompt_tokens"] if isinstance(usage.get("prompt_tokens"), int) else None,
            cached_prompt_tokens=cached if isinstance(cached, int) else None,
        )
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta") or {}
        text = delta.get("content") if isinstance(delta, dict) else None
        if text is None:  # text_completion chunks carry "text" instead of a delta
            text = choice.get("text")
        if text:
            tally = replace(
                tally,
                first_token_at=tally.first_token_at if tally.first_token_at is not None else now,
                token_chunk_times=(*tally.token_chunk_times, now),
            )
    return tally


def result_from_tally(tally: StreamTally, started_at: float, finished_at: float) -> RequestResult:
    error = tally.error
    if error is None and not tally.done:
        error = "stream ended without data: [DONE]"
    return RequestResult(
        started_at=started_at,
        finished_at=finished_at,
        first_token_at=tally.first_token_at,
        token_chunk_times=tally.token_chunk_times,
        n_output_tokens=tally.usage_tokens if tally.usage_tokens is not None else len(tally.token_chunk_times),
        usage_reported=tally.usage_tokens is not None,
        error=error,
        n_prompt_tokens=tally.prompt_tokens,
        n_cached_prompt_tokens=tally.cached_prompt_tokens,
    )


async def stream_one(client: httpx.AsyncClient, plan: LoadPlan, prompt: str, send_extras: bool) -> RequestResult:
    """Send one streaming chat request and time it; failures become a RequestResult with `error` set."""
    started_at = time.perf_counter()
    tally = StreamTally()
    try:
        async with client.stream(
            "POST",
            f"{plan.base_url}/chat/completions",
            json=chat_request_body(plan, prompt, send_extras),
            headers={"Authorization": f"Bearer {plan.api_key}"} if plan.api_key else None,
        ) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                tally = replace(tally, error=f"HTTP {response.status_code}: {text[:ERROR_TEXT_LIMIT]}")
            else:
                async for line in response.aiter_lines():
                    tally = apply_sse_line(tally, line, time.perf_counter())
                    if tally.error is not None or tally.done:
                        break
    except httpx.HTTPError as exc:
        tally = replace(tally, error=f"{type(exc).__name__}: {exc}"[:ERROR_TEXT_LIMIT])
    return result_from_tally(tally, started_at, time.perf_counter())


# Sends one request (prompt, whether to send llama.cpp's extras) for one worker and times it.
Sender = Callable[[str, bool, int], Awaitable[RequestResult]]


class RawSender:
    """bench.sse_client over one keep-alive connection per worker: the default, on real sockets."""

    def __init__(self, plan: LoadPlan) -> None:
        self._plan = plan
        self._endpoint = Endpoint.from_base_url(plan.base_url, plan.api_key)
        self._connections: dict[int, Connection] = {}

    async def __call__(self, prompt: str, send_extras: bool, worker: int) -> RequestResult:
        connection = self._connections.get(worker)
        if connection is None:
            connection = self._connections[worker] = Connection(self._endpoint)
        return await raw_stream_one(connection, self._plan, prompt, send_extras)

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()


async def raw_stream_one(connection: Connection, plan: LoadPlan, prompt: str, send_extras: bool) -> RequestResult:
    """stream_one over bench.sse_client: the same request, the same tally, a fraction of httpx's CPU."""
    started_at = time.perf_counter()
    tally = StreamTally()
    body = json.dumps(chat_request_body(plan, prompt, send_extras)).encode()

    def on_line(line: str, now: float) -> bool:
        nonlocal tally
        tally = apply_sse_line(tally, line, now)
        return tally.error is not None or tally.done

    try:
        async with asyncio.timeout(plan.request_timeout_s):
            response, response_body = await connection.request("POST", "/chat/completions", body)
            if response.status != 200:
                text = (await read_all(response_body)).decode(errors="replace")
                tally = replace(tally, error=f"HTTP {response.status}: {text[:ERROR_TEXT_LIMIT]}")
            else:
                await read_lines(response_body, on_line)
    except (OSError, EOFError, ValueError, TimeoutError) as exc:  # IncompleteReadError is an EOFError
        connection.close()
        tally = replace(tally, error=f"{type(exc).__name__}: {exc}"[:ERROR_TEXT_LIMIT])
    return result_from_tally(tally, started_at, time.perf_counter())


async def run_level(
    send: Sender,
    plan: LoadPlan,
    concurrency: int,
    n_requests: int,
    send_extras: bool,
    on_result: Callable[[RequestResult], None],
) -> list[RequestResult]:
    """Closed loop: `concurrency` workers drain a queue of n_requests; stops at plan.level_timeout_s."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(n_requests):
        queue.put_nowait(index)
    results: list[RequestResult] = []
    in_flight: dict[int, float] = {}

    async def worker(worker_id: int) -> None:
        while True:
            try:
                index = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            in_flight[worker_id] = time.perf_counter()
            result = await send(plan.prompts[index % len(plan.prompts)], send_extras, worker_id)
            del in_flight[worker_id]
            results.append(result)
            on_result(result)

    workers = [asyncio.create_task(worker(worker_id)) for worker_id in range(concurrency)]
    try:
        await asyncio.wait_for(asyncio.gather(*workers), timeout=plan.level_timeout_s)
    except TimeoutError:
        now = time.perf_counter()
        timed_out = [
            RequestResult(
                started_at=started_at,
                finished_at=now,
                first_token_at=None,
                token_chunk_times=(),
                n_output_tokens=0,
                usage_reported=False,
                error=f"level timeout after {plan.level_timeout_s:g} s",
            )
            for started_at in in_flight.values()
        ]
        results.extend(timed_out)
    return results


async def probe_extras(send: Sender, plan: LoadPlan) -> bool:
    """Warm the server up and find out whether it accepts the llama.cpp extras (ignore_eos, n_predict).

    A server that rejects unknown fields answers 400/422; then the run goes on without them.
    """
    send_extras = plan.ignore_eos
    for _ in range(max(plan.warmup_requests, 1)):
        result = await send(plan.prompts[0], send_extras, 0)
        if result.ok:
            continue
        if send_extras and result.error is not None and result.error.startswith(("HTTP 400", "HTTP 422")):
            send_extras = False
            retry = await send(plan.prompts[0], send_extras, 0)
            if retry.ok:
                continue
            result = retry
        raise LoadError(f"warm-up request to {plan.base_url} failed: {result.error}")
    return send_extras


async def discover_model(base_url: str, timeout_s: float = 10.0) -> str:
    """The first model id the server lists under /models (what clients must put in `model`)."""
    async with httpx.AsyncClient(timeout=timeout_s, trust_env=False) as client:
        try:
            response = await client.get(f"{base_url}/models")
            response.raise_for_status()
            models = response.json().get("data") or []
            return str(models[0]["id"])
        except (httpx.HTTPError, ValueError, LookupError, AttributeError, TypeError) as exc:
            raise LoadError(f"cannot list models at {base_url}/models ({exc}); pass --model") from exc


async def run_load(
    plan: LoadPlan,
    label: str,
    show_progress: bool = True,
    transport: httpx.AsyncBaseTransport | None = None,
    on_level_edge: Callable[[], None] | None = None,
) -> LoadReport:
    """Run every concurrency level of the plan in order against one server; on_level_edge: called right before
    and right after each level's requests, e.g. to read CPU counters.

    Requests go out through bench.sse_client, one keep-alive connection per client; with `transport` (tests:
    an in-process fake server) through httpx instead.
    """
    async with contextlib.AsyncExitStack() as stack:
        send: Sender
        if transport is None:
            raw = RawSender(plan)
            stack.callback(raw.close)
            send = raw
        else:
            n_connections = max(plan.concurrency_levels) + 4
            client = await stack.enter_async_context(
                httpx.AsyncClient(
                    timeout=httpx.Timeout(plan.request_timeout_s, connect=10.0),
                    limits=httpx.Limits(max_connections=n_connections, max_keepalive_connections=n_connections),
                    trust_env=False,
                    transport=transport,
                )
            )

            async def send(prompt: str, send_extras: bool, worker: int) -> RequestResult:
                return await stream_one(client, plan, prompt, send_extras)

        send_extras = await probe_extras(send, plan)
        summaries: list[LevelSummary] = []
        for concurrency, n_requests in zip(plan.concurrency_levels, plan.requests_per_level, strict=True):
            summaries.append(
                await _run_level_with_progress(
                    send, plan, label, concurrency, n_requests, send_extras, show_progress, on_level_edge
                )
            )
    settings = RunSettings(
        base_url=plan.base_url,
        model=plan.model,
        max_tokens=plan.max_tokens,
        concurrency_levels=plan.concurrency_levels,
        requests_per_level=plan.requests_per_level,
        n_prompts=len(plan.prompts),
        sent_ignore_eos=send_extras,
        banned_token_ids=plan.banned_token_ids,
    )
    return LoadReport(label=label, settings=settings, levels=tuple(summaries))


async def _run_level_with_progress(
    send: Sender,
    plan: LoadPlan,
    label: str,
    concurrency: int,
    n_requests: int,
    send_extras: bool,
    show_progress: bool,
    on_level_edge: Callable[[], None] | None = None,
) -> LevelSummary:
    with tqdm(
        total=n_requests, desc=f"{label} c={concurrency}", unit="req", disable=not show_progress, leave=True
    ) as bar:
        level_started = time.perf_counter()
        n_tokens = 0

        def on_result(result: RequestResult) -> None:
            nonlocal n_tokens
            n_tokens += result.n_output_tokens
            bar.update(1)
            bar.set_postfix(tok_s=f"{n_tokens / max(time.perf_counter() - level_started, 1e-9):.1f}")

        if on_level_edge is not None:
            on_level_edge()
        cpu_started = time.process_time()
        results = await run_level(send, plan, concurrency, n_requests, send_extras, on_result)
        client_cpu_s = time.process_time() - cpu_started
        if on_level_edge is not None:
            on_level_edge()
    return summarize_level(concurrency, plan.max_tokens, results, client_cpu_s=client_cpu_s)


TABLE_HEADER = (
    f"{'server':<18} {'conc':>4} {'ok/req':>8} {'tok/s':>8} {'req/s':>7} {'tok/req':>7} "
    f"{'TTFT p50':>9} {'p95':>8} {'ITL p50':>8} {'p95':>7}"
)


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}ms" if value >= 100 else f"{value:.1f}ms"


def format_level_row(label: str, level: LevelSummary) -> str:
    per_request = "-" if level.mean_output_tokens_per_request is None else f"{level.mean_output_tokens_per_request:.1f}"
    return (
        f"{label:<18} {level.concurrency:>4} {f'{level.n_ok}/{level.n_requests}':>8} "
        f"{level.output_tokens_per_s:>8.1f} {level.requests_per_s:>7.2f} {per_request:>7} "
        f"{_fmt_ms(level.ttft_p50_ms):>9} {_fmt_ms(level.ttft_p95_ms):>8} "
        f"{_fmt_ms(level.itl_p50_ms):>8} {_fmt_ms(level.itl_p95_ms):>7}"
    )


def format_reports(reports: Sequence[LoadReport]) -> str:
    """One table, a row per server and level, then each level's error samples and caveats."""
    lines = [TABLE_HEADER]
    lines += [format_level_row(report.label, level) for report in reports for level in report.levels]
    for report in reports:
        for level in report.levels:
            lines += [f"  {report.label} c={level.concurrency} error: {sample}" for sample in level.error_samples]
            if level.n_short_outputs:
                lines.append(
                    f"  {report.label} c={level.concurrency}: {level.n_short_outputs} of {level.n_ok} requests "
                    f"ended before max_tokens={report.settings.max_tokens}"
                )
        if not report.settings.sent_ignore_eos:
            lines.append(f"  note: {report.label} refused ignore_eos/n_predict; requests may end before max_tokens")
    return "\n".join(lines)


def plot_reports(
    reports: Sequence[LoadReport],
    path: Path,
    title: str = "Load benchmark",
    reference_lines: Sequence[tuple[str, Sequence[tuple[int, float]]]] = (),
) -> None:
    """PNG: aggregate output tokens/s (left) and TTFT p50/p95 (right) by concurrency, a line per server.

    reference_lines: (label, [(concurrency, tokens/s), ...]) drawn dashed on the throughput side only
    (a ceiling measured without a server has no TTFT).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    figure, (throughput_axis, ttft_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    levels = sorted({level.concurrency for report in reports for level in report.levels})
    for report in reports:
        xs = [level.concurrency for level in report.levels]
        (line,) = throughput_axis.plot(
            xs, [level.output_tokens_per_s for level in report.levels], marker="o", label=report.label
        )
        p50 = [level.ttft_p50_ms if level.ttft_p50_ms is not None else float("nan") for level in report.levels]
        p95 = [level.ttft_p95_ms if level.ttft_p95_ms is not None else float("nan") for level in report.levels]
        ttft_axis.plot(xs, p50, marker="o", color=line.get_color(), label=f"{report.label} p50")
        ttft_axis.plot(xs, p95, marker="x", linestyle="--", color=line.get_color(), label=f"{report.label} p95")
    for label, points in reference_lines:
        throughput_axis.plot(
            [x for x, _ in points], [y for _, y in points], linestyle=":", marker="^", color="grey", label=label
        )
    for axis, ylabel in (
        (throughput_axis, "output tokens/s (aggregate)"),
        (ttft_axis, "time to first token (ms)"),
    ):
        axis.set_xscale("log", base=2)
        axis.set_xticks(levels, [str(level) for level in levels])
        axis.set_xlabel("concurrent streams")
        axis.set_ylabel(ylabel)
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_json(path: Path, body: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=2) + "\n")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True, help="OpenAI base URL on loopback, e.g. http://127.0.0.1:8080/v1")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated levels (default 1,4,16)")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (default 64)")
    parser.add_argument(
        "--requests-per-level",
        type=int,
        help=f"requests per level (default {DEFAULT_REQUESTS_PER_CLIENT} × concurrency)",
    )
    parser.add_argument("--model", help="model id to send (default: the first one /models lists)")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS_PATH, help="JSON list of prompts")
    parser.add_argument("--label", default="server", help="name of the server in tables and plots")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--plot", type=Path, help="write a PNG of throughput and TTFT against concurrency")
    parser.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos/n_predict")
    parser.add_argument(
        "--json-schema", type=Path, help="constrain every answer to this JSON schema (response_format json_schema)"
    )
    parser.add_argument(
        "--ban-token-id",
        type=int,
        action="append",
        default=[],
        help="logit_bias -100 on this token (repeatable)",
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed requests first (at least 1: it also probes the extras)"
    )
    parser.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S, help="seconds")
    parser.add_argument("--level-timeout", type=float, default=DEFAULT_LEVEL_TIMEOUT_S, help="seconds per level")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def plan_from_args(args: argparse.Namespace, model: str) -> LoadPlan:
    if args.max_tokens < 1:
        raise LoadError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.request_timeout <= 0 or args.level_timeout <= 0:
        raise LoadError("--request-timeout and --level-timeout must be positive")
    levels = parse_levels(args.concurrency)
    return LoadPlan(
        base_url=require_loopback(args.base_url),
        model=model,
        prompts=load_prompts(args.prompts),
        max_tokens=args.max_tokens,
        concurrency_levels=levels,
        requests_per_level=requests_for_levels(levels, args.requests_per_level),
        ignore_eos=not args.no_ignore_eos,
        banned_token_ids=tuple(args.ban_token_id),
        request_timeout_s=args.request_timeout,
        level_timeout_s=args.level_timeout,
        warmup_requests=max(args.warmup, 0),
        response_format=None if args.json_schema is None else json_schema_format(args.json_schema),
    )


async def _main_async(args: argparse.Namespace) -> LoadReport:
    base_url = require_loopback(args.base_url)
    model = args.model or await discover_model(base_url)
    plan = plan_from_args(args, model)
    return await run_load(plan, args.label, show_progress=not args.no_progress)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        report = asyncio.run(_main_async(args))
    except LoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(format_reports([report]))
    if args.json is not None:
        write_json(args.json, report_to_json(report))
    if args.plot is not None:
        plot_reports([report], args.plot, title=f"{report.label}: {report.settings.max_tokens} tokens per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
