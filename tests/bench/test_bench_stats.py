"""bench.stats: percentiles, per-level aggregation and the JSON report layout (pure, no server)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.stats import (
    MAX_ERROR_SAMPLES,
    REPORT_SCHEMA_VERSION,
    LoadReport,
    RequestResult,
    RunSettings,
    percentile,
    report_to_json,
    summarize_level,
    validate_report_json,
)


@pytest.mark.parametrize(
    "values",
    [[5.0], [3.0, 1.0], [1.0, 2.0, 3.0, 4.0], [0.2, 9.5, 3.3, 3.3, 7.1, 0.0, 12.25], list(np.linspace(0, 1, 101))],
)
@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.5, 0.95, 0.99, 1.0])
def test_percentile_matches_numpy_linear_method(values: list[float], fraction: float) -> None:
    assert percentile(values, fraction) == pytest.approx(float(np.percentile(values, fraction * 100)))


def test_percentile_of_nothing_is_none_and_bad_fraction_is_refused() -> None:
    assert percentile([], 0.5) is None
    with pytest.raises(ValueError, match="within"):
        percentile([1.0], 95)


def _result(
    start: float,
    chunk_times: tuple[float, ...],
    end: float,
    n_tokens: int | None = None,
    error: str | None = None,
    usage: bool = True,
) -> RequestResult:
    return RequestResult(
        started_at=start,
        finished_at=end,
        first_token_at=chunk_times[0] if chunk_times else None,
        token_chunk_times=chunk_times,
        n_output_tokens=len(chunk_times) if n_tokens is None else n_tokens,
        usage_reported=usage,
        error=error,
    )


def test_request_result_derives_ttft_and_gaps() -> None:
    result = _result(10.0, (10.5, 10.6, 10.8), 10.9)
    assert result.ttft_s == pytest.approx(0.5)
    assert result.inter_token_gaps_s == pytest.approx((0.1, 0.2))
    assert result.ok
    assert _result(1.0, (), 2.0, error="boom").ttft_s is None


def test_summarize_level_aggregates_only_successful_requests() -> None:
    results = [
        _result(0.0, (0.5, 0.6, 0.7, 0.8), 1.0),  # ttft 0.5, gaps 0.1 x3
        _result(0.2, (1.2, 1.5, 1.8, 2.1), 4.0),  # ttft 1.0, gaps 0.3 x3; ends last
        _result(0.1, (0.4,), 0.5, n_tokens=1),  # stopped early: 1 token of 4
        _result(0.3, (), 0.9, error="HTTP 500: oops"),
        _result(0.3, (), 0.9, error="HTTP 500: oops"),
    ]
    level = summarize_level(4, 4, results)
    assert level.concurrency == 4
    assert (level.n_requests, level.n_ok, level.n_errors) == (5, 3, 2)
    assert level.wall_s == pytest.approx(4.0)
    assert level.output_tokens == 9
    assert level.output_tokens_per_s == pytest.approx(9 / 4.0)
    assert level.requests_per_s == pytest.approx(3 / 4.0)
    assert level.mean_output_tokens_per_request == pytest.approx(3.0)
    assert level.n_short_outputs == 1
    assert level.ttft_p50_ms == pytest.approx(500.0)  # ttfts 0.5, 0.3, 1.0
    assert level.ttft_p95_ms == pytest.approx(1000 * float(np.percentile([0.5, 0.3, 1.0], 95)))
    assert level.itl_p50_ms == pytest.approx(200.0)  # gaps 0.1 x3 and 0.3 x3, interpolated
    assert level.error_samples == ("HTTP 500: oops",)
    assert level.usage_reported


def test_summarize_level_median_gap_is_interpolated() -> None:
    results = [_result(0.0, (0.0, 0.1, 0.2), 0.3), _result(0.0, (0.0, 0.3, 0.6), 0.7)]
    level = summarize_level(2, 3, results)
    assert level.itl_p50_ms == pytest.approx(200.0)  # gaps 0.1, 0.1, 0.3, 0.3
    assert level.n_short_outputs == 0


def test_summarize_level_of_only_failures_has_no_latencies() -> None:
    results = [_result(0.0, (), 1.0, error=f"error {index}") for index in range(MAX_ERROR_SAMPLES + 2)]
    level = summarize_level(1, 8, results)
    assert (level.n_ok, level.n_errors, level.output_tokens) == (0, MAX_ERROR_SAMPLES + 2, 0)
    assert level.output_tokens_per_s == 0.0
    assert level.ttft_p50_ms is None and level.itl_p95_ms is None
    assert level.mean_output_tokens_per_request is None
    assert not level.usage_reported
    assert len(level.error_samples) == MAX_ERROR_SAMPLES


def test_usage_reported_only_when_every_request_had_a_usage_chunk() -> None:
    results = [_result(0.0, (0.1, 0.2), 0.3), _result(0.0, (0.1, 0.2), 0.3, usage=False)]
    assert not summarize_level(2, 2, results).usage_reported


def _report() -> LoadReport:
    settings = RunSettings(
        base_url="http://127.0.0.1:8080/v1",
        model="m",
        max_tokens=4,
        concurrency_levels=(1, 4),
        requests_per_level=(2, 2),
        n_prompts=3,
        sent_ignore_eos=True,
    )
    levels = (
        summarize_level(1, 4, [_result(0.0, (0.1, 0.2, 0.3, 0.4), 0.5)] * 2),
        summarize_level(4, 4, [_result(0.0, (0.1, 0.2, 0.3, 0.4), 0.5), _result(0.0, (), 0.2, error="x")]),
    )
    return LoadReport(label="server", settings=settings, levels=levels)


def test_report_json_is_plain_json_and_validates() -> None:
    body = json.loads(json.dumps(report_to_json(_report())))
    assert body["schema_version"] == REPORT_SCHEMA_VERSION
    assert validate_report_json(body) == []
    assert [level["concurrency"] for level in body["levels"]] == [1, 4]
    assert body["levels"][1]["error_samples"] == ["x"]
    assert body["settings"]["concurrency_levels"] == [1, 4]


def test_validate_report_json_names_what_is_wrong() -> None:
    body = json.loads(json.dumps(report_to_json(_report())))
    del body["levels"][0]["ttft_p50_ms"]
    body["levels"][1]["n_errors"] = -1
    body["levels"][1]["output_tokens_per_s"] = "fast"
    body["schema_version"] = 99
    problems = validate_report_json(body)
    assert any("levels[0] lacks ttft_p50_ms" in problem for problem in problems)
    assert any("levels[1].n_errors" in problem for problem in problems)
    assert any("levels[1].output_tokens_per_s" in problem for problem in problems)
    assert any("schema_version" in problem for problem in problems)
    assert validate_report_json([]) == ["report is not a JSON object"]
    assert "levels must be a list" in validate_report_json({"schema_version": REPORT_SCHEMA_VERSION})
