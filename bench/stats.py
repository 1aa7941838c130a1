"""Pure result maths of the load benchmark: per-request records in, per-concurrency-level summaries out.

No I/O here, so the numbers a report prints can be tested without a server.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

# Bumped whenever a field of the JSON report changes meaning or disappears.
REPORT_SCHEMA_VERSION = 1
MAX_ERROR_SAMPLES = 5


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); None for no values.

    fraction is in [0, 1] (0.5 = median, 0.95 = p95).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"percentile fraction must be within [0, 1], got {fraction}")
    if not values:
        return None
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    below = math.floor(position)
    above = math.ceil(position)
    weight = position - below
    return ordered[below] + (ordered[above] - ordered[below]) * weight


@dataclass(frozen=True)
class RequestResult:
    """One streamed request as the client saw it; times are seconds on the client's monotonic clock."""

    started_at: float
    finished_at: float
    first_token_at: float | None
    # Arrival time of every chunk that carried generated text, in order.
    token_chunk_times: tuple[float, ...]
    n_output_tokens: int
    # True when the count came from the server's usage chunk, False when chunks were counted instead.
    usage_reported: bool
    error: str | None = None
    # From the usage chunk, where the server sends them: the prompt's length and how much of it came from a
    # cache (OpenAI's prompt_tokens_details.cached_tokens), so prompt tokens computed = the difference.
    n_prompt_tokens: int | None = None
    n_cached_prompt_tokens: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started_at

    @property
    def inter_token_gaps_s(self) -> tuple[float, ...]:
        times = self.token_chunk_times
        return tuple(later - earlier for earlier, later in itertools.pairwise(times))


@dataclass(frozen=True)
class LevelSummary:
    """Aggregate numbers of one concurrency level; latencies in milliseconds."""

    concurrency: int
    n_requests: int
    n_ok: int
    n_errors: int
    wall_s: float
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    mean_output_tokens_per_request: float | None
    # Successful requests that ended before max_tokens (EOS honoured, or a server cutting streams short).
    n_short_outputs: int
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    itl_p50_ms: float | None
    itl_p95_ms: float | None
    usage_reported: bool
    error_samples: tuple[str, ...]
    # Means over the successful requests whose usage said so (None where none did).
    mean_prompt_tokens: float | None = None
    mean_computed_prompt_tokens: float | None = None
    # CPU seconds the load generator's own process used while this level ran: on a machine with few cores it
    # is taken from the server being measured.
    client_cpu_s: float | None = None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def summarize_level(
    concurrency: int, max_tokens: int, results: Sequence[RequestResult], client_cpu_s: float | None = None
) -> LevelSummary:
    """Aggregate one level. Wall time runs from the first request's start to the last one's end, so
    throughput counts only what the server did while this level's clients were active."""
    ok_results = [result for result in results if result.ok]
    wall_s = (
        max(result.finished_at for result in results) - min(result.started_at for result in results) if results else 0.0
    )
    output_tokens = sum(result.n_output_tokens for result in ok_results)
    ttfts = [result.ttft_s for result in ok_results if result.ttft_s is not None]
    gaps = [gap for result in ok_results for gap in result.inter_token_gaps_s]
    errors = [result.error for result in results if result.error is not None]
    prompts = [result.n_prompt_tokens for result in ok_results if result.n_prompt_tokens is not None]
    computed = [
        result.n_prompt_tokens - (result.n_cached_prompt_tokens or 0)
        for result in ok_results
        if result.n_prompt_tokens is not None
    ]
    return LevelSummary(
        concurrency=concurrency,
        n_requests=len(results),
        n_ok=len(ok_results),
        n_errors=len(errors),
        wall_s=wall_s,
        output_tokens=output_tokens,
        output_tokens_per_s=output_tokens / wall_s if wall_s > 0 else 0.0,
        requests_per_s=len(ok_results) / wall_s if wall_s > 0 else 0.0,
        mean_output_tokens_per_request=output_tokens / len(ok_results) if ok_results else None,
        n_short_outputs=sum(1 for result in ok_results if result.n_output_tokens < max_tokens),
        ttft_p50_ms=_ms(percentile(ttfts, 0.50)),
        ttft_p95_ms=_ms(percentile(ttfts, 0.95)),
        itl_p50_ms=_ms(percentile(gaps, 0.50)),
        itl_p95_ms=_ms(percentile(gaps, 0.95)),
        usage_reported=bool(ok_results) and all(result.usage_reported for result in ok_results),
        error_samples=tuple(dict.fromkeys(errors))[:MAX_ERROR_SAMPLES],
        mean_prompt_tokens=sum(prompts) / len(prompts) if prompts else None,
        mean_computed_prompt_tokens=sum(computed) / len(computed) if computed else None,
        client_cpu_s=client_cpu_s,
    )


@dataclass(frozen=True)
class RunSettings:
    """What the load generator was asked to do; stored in the report so a run can be repeated."""

    base_url: str
    model: str
    max_tokens: int
    concurrency_levels: tuple[int, ...]
    requests_per_level: tuple[int, ...]
    n_prompts: int
    # Whether ignore_eos/n_predict went out (a server may still ignore them: see n_short_outputs).
    sent_ignore_eos: bool
    # Token ids sent with logit_bias -100 (EOS, for servers without ignore_eos).
    banned_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class LoadReport:
    label: str
    settings: RunSettings
    levels: tuple[LevelSummary, ...]


def report_to_json(report: LoadReport) -> dict[str, Any]:
    """The report as plain JSON data (schema_version says which layout)."""
    body = asdict(report)
    body["schema_version"] = REPORT_SCHEMA_VERSION
    return body


LEVEL_FIELDS: tuple[str, ...] = tuple(LevelSummary.__dataclass_fields__)


def validate_report_json(body: Any) -> list[str]:
    """Problems with a JSON report (empty when it is well-formed); used by tests and by bench.compare."""
    problems: list[str] = []
    if not isinstance(body, dict):
        return ["report is not a JSON object"]
    if body.get("schema_version") != REPORT_SCHEMA_VERSION:
        problems.append(f"schema_version is {body.get('schema_version')!r}, expected {REPORT_SCHEMA_VERSION}")
    if not isinstance(body.get("label"), str):
        problems.append("label must be a string")
    if not isinstance(body.get("settings"), dict):
        problems.append("settings must be an object")
    levels = body.get("levels")
    if not isinstance(levels, list):
        return [*problems, "levels must be a list"]
    for index, level in enumerate(levels):
        if not isinstance(level, dict):
            problems.append(f"levels[{index}] is not an object")
            continue
        missing = [name for name in LEVEL_FIELDS if name not in level]
        if missing:
            problems.append(f"levels[{index}] lacks {', '.join(missing)}")
        for name in ("concurrency", "n_requests", "n_ok", "n_errors", "n_short_outputs", "output_tokens"):
            if name in level and not (isinstance(level[name], int) and level[name] >= 0):
                problems.append(f"levels[{index}].{name} must be a non-negative integer")
        for name in ("wall_s", "output_tokens_per_s", "requests_per_s"):
            if name in level and not (isinstance(level[name], int | float) and level[name] >= 0):
                problems.append(f"levels[{index}].{name} must be a non-negative number")
    return problems
