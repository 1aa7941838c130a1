"""bench.soak: the request mix, stream classification, per-window TTFT, the RSS flatness rule and the
verdict (pure), plus one short client run against an in-process fake server (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.load import DEFAULT_PROMPTS_PATH, StreamTally, load_prompts
from bench.soak import (
    DISCONNECTED,
    ERROR,
    OK,
    OUTPUT_LENGTHS,
    RssCheck,
    RssSample,
    SoakConfig,
    SoakResult,
    classify_stream,
    format_report,
    plot_report,
    report_json,
    request_spec,
    rss_flatness,
    run_soak,
    soak_request_body,
    soak_verdict,
    window_summaries,
)

PROMPTS = load_prompts(DEFAULT_PROMPTS_PATH)
MIB = 2**20


def test_request_mix_is_repeatable_and_varied() -> None:
    specs = [request_spec(i, PROMPTS, seed=7, disconnect_fraction=0.1) for i in range(2000)]
    assert specs == [request_spec(i, PROMPTS, seed=7, disconnect_fraction=0.1) for i in range(2000)]
    assert specs != [request_spec(i, PROMPTS, seed=8, disconnect_fraction=0.1) for i in range(2000)]
    assert {s.max_tokens for s in specs} == set(OUTPUT_LENGTHS)
    assert {s.temperature for s in specs} == {0.0, 0.8}
    prompt_lengths = sorted(len(s.prompt) for s in specs)
    assert prompt_lengths[-1] > 10 * prompt_lengths[0]  # short single questions and long lists of them
    hang_ups = [s for s in specs if s.disconnect_after is not None]
    assert 150 <= len(hang_ups) <= 250  # ~10% of 2000
    assert all(1 <= s.disconnect_after <= max(1, s.max_tokens // 2) for s in hang_ups if s.disconnect_after)
    assert not any(request_spec(i, PROMPTS, 7, 0.0).disconnect_after for i in range(200))


def test_request_body_asks_for_usage_and_exact_length() -> None:
    spec = request_spec(3, PROMPTS, seed=0, disconnect_fraction=0.1)
    body = soak_request_body("m", spec, ignore_eos=True)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == spec.max_tokens and body["ignore_eos"] is True
    assert body["messages"] == [{"role": "user", "content": spec.prompt}]
    assert "ignore_eos" not in soak_request_body("m", spec, ignore_eos=False)


def test_stream_classification() -> None:
    spec = request_spec(0, PROMPTS, 0, 0.0)
    done = StreamTally(first_token_at=1.0, token_chunk_times=(1.0,), usage_tokens=spec.max_tokens, done=True)
    assert classify_stream(done, spec, hung_up=False, check_length=True) == (OK, None)
    assert classify_stream(StreamTally(token_chunk_times=(1.0,)), spec, hung_up=True, check_length=True) == (
        DISCONNECTED,
        None,
    )
    outcome, error = classify_stream(StreamTally(usage_tokens=2), spec, hung_up=False, check_length=True)
    assert outcome == ERROR and "[DONE]" in (error or "")
    short = StreamTally(usage_tokens=spec.max_tokens - 1, done=True)
    outcome, error = classify_stream(short, spec, hung_up=False, check_length=True)
    assert outcome == ERROR and f"of {spec.max_tokens} tokens" in (error or "")
    assert classify_stream(short, spec, hung_up=False, check_length=False) == (OK, None)
    # an error event wins even when the client meant to hang up anyway
    broken = StreamTally(error="error in stream: boom")
    assert classify_stream(broken, spec, hung_up=True, check_length=True) == (ERROR, "error in stream: boom")


def _result(started: float, ttft: float | None, outcome: str = OK, tokens: int = 10, finished: float = 0) -> SoakResult:
    return SoakResult(0, started, finished or started + 1, ttft, tokens, 10, outcome, None if outcome != ERROR else "x")


def test_windows_split_ttft_and_counts_by_start_time() -> None:
    results = [
        _result(1, 0.100),
        _result(2, 0.300),
        _result(3, 0.200, DISCONNECTED, tokens=4),
        _result(4, None, ERROR, tokens=0),
        _result(11, 1.000),
        _result(12, 3.000, finished=25),  # streams 15-25 s, past the run's end: half its tokens are in no window
        _result(8, 1.000, tokens=20, finished=14),  # streams 9-14 s: a fifth in the first window
    ]
    windows = window_summaries(results, window_s=10, duration_s=20)
    assert [(w.start_s, w.end_s) for w in windows] == [(0, 10), (10, 20)]
    first, second = windows
    assert (first.n_requests, first.n_ok, first.n_disconnected, first.n_errors) == (5, 3, 1, 1)
    assert first.ttft_p50_ms == pytest.approx(250.0)  # the disconnected request's first token counts too
    assert first.ttft_p95_ms == pytest.approx(895.0)
    assert first.output_tokens_per_s == pytest.approx((10 + 10 + 4 + 4) / 10)  # the error's tokens do not count
    assert second.ttft_p50_ms == pytest.approx(2000.0) and second.n_requests == 2
    assert second.output_tokens_per_s == pytest.approx((10 + 5 + 16) / 10)
    partial = window_summaries([], window_s=60, duration_s=90)
    assert [(w.start_s, w.end_s, w.ttft_p50_ms) for w in partial] == [(0, 60, None), (60, 90, None)]
    with pytest.raises(ValueError):
        window_summaries(results, window_s=0, duration_s=20)


def _samples(values_mib: list[float], interval: float = 5.0) -> list[RssSample]:
    return [RssSample(i * interval, int(v * MIB)) for i, v in enumerate(values_mib)]


def test_rss_after_warm_up_growth_within_tolerance_is_flat() -> None:
    # warm-up climbs from 300 to 400 MiB (caches filling), then 400 → 410 MiB (2.5%)
    warmup = [300 + i * 5 for i in range(20)]
    steady = [400 + i * 10 / 79 for i in range(80)]
    check = rss_flatness(_samples(warmup + steady), warmup_s=100, tolerance=0.05)
    assert check.flat, check.reason
    assert check.initial_bytes == 300 * MIB
    assert check.start_bytes is not None and abs(check.start_bytes - 400.6 * MIB) < MIB
    assert check.end_bytes is not None and abs(check.end_bytes - 409.4 * MIB) < MIB
    assert check.spread is not None and 0.015 < check.spread < 0.03
    assert check.peak_bytes == int(410 * MIB)


def test_rss_that_keeps_growing_after_warm_up_is_not_flat() -> None:
    leak = [400 + i * 1.0 for i in range(100)]  # 1 MiB per sample: +20% over the run
    check = rss_flatness(_samples(leak), warmup_s=100, tolerance=0.05)
    assert not check.flat
    assert check.spread is not None and check.spread > 0.1
    assert "spread" in check.reason and ">" in check.reason


def test_one_transient_spike_does_not_decide_flatness() -> None:
    values = [400.0] * 100
    values[-1] = 600.0  # the very last sample, e.g. a burst of buffers
    values[60] = 700.0
    check = rss_flatness(_samples(values), warmup_s=100, tolerance=0.05)
    assert check.flat, check.reason
    assert check.peak_bytes == 700 * MIB  # still reported


def test_too_few_samples_after_warm_up_is_not_flat() -> None:
    check = rss_flatness(_samples([400.0] * 10), warmup_s=40, tolerance=0.05)
    assert not check.flat and "samples after" in check.reason
    assert not rss_flatness([], warmup_s=0, tolerance=0.05).flat


def _rss(flat: bool) -> RssCheck:
    return RssCheck(1, 2, 2, 2, 2, 0.0 if flat else 0.2, 0.05, flat, "RSS reason")


def test_verdict_needs_every_condition() -> None:
    assert soak_verdict(100, 0, _rss(True), healthy_at_end=True, slots_idle_at_end=True).passed
    assert soak_verdict(100, 0, _rss(True), healthy_at_end=True, slots_idle_at_end=None).passed
    cases = [
        (soak_verdict(100, 1, _rss(True), True, True), "1 of 100 requests failed"),
        (soak_verdict(100, 0, _rss(False), True, True), "RSS reason"),
        (soak_verdict(100, 0, _rss(True), False, True), "/health"),
        (soak_verdict(100, 0, _rss(True), True, False), "slots were still busy"),
        (soak_verdict(0, 0, _rss(True), True, True), "no request completed"),
    ]
    for verdict, failure in cases:
        assert not verdict.passed
        assert any(failure in line for line in verdict.failures), verdict.failures


class FakeServer:
    """Answers a stream of exactly max_tokens one-character chunks, or a 500 to 48-token requests."""

    def __init__(self) -> None:
        self.n_chat = 0

    async def handle(self, request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.005)  # a real server makes clients wait; without it no other task would run
        if request.url.path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        if request.url.path == "/slots":
            return httpx.Response(200, json=[{"state": "idle"}, {"state": "idle"}])
        body: dict[str, Any] = json.loads(request.content)
        self.n_chat += 1
        if body["max_tokens"] == 48:
            return httpx.Response(500, json={"error": {"message": "boom"}})
        chunks: list[dict[str, Any]] = [
            {"choices": [{"index": 0, "delta": {"content": "x"}}]} for _ in range(body["max_tokens"])
        ]
        chunks.append({"choices": [], "usage": {"completion_tokens": body["max_tokens"]}})
        text = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})


def test_run_soak_counts_outcomes_windows_and_samples_rss(tmp_path: Path) -> None:
    server = FakeServer()
    config = SoakConfig(
        base_url="http://127.0.0.1:9/v1",
        model="fake",
        prompts=PROMPTS,
        duration_s=0.4,
        concurrency=4,
        disconnect_fraction=0.3,
        warmup_s=0.0,
        window_s=0.2,
        rss_interval_s=0.01,
    )
    lines: list[str] = []
    report = asyncio.run(
        run_soak(config, os.getpid(), on_window=lines.append, transport=httpx.MockTransport(server.handle))
    )
    assert report.n_requests == server.n_chat >= 8
    specs = {i: request_spec(i, PROMPTS, 0, 0.3) for i in range(report.n_requests)}
    expected_errors = sum(1 for s in specs.values() if s.max_tokens == 48)
    expected_hang_ups = sum(1 for s in specs.values() if s.max_tokens != 48 and s.disconnect_after is not None)
    assert report.n_errors == expected_errors and report.n_disconnected == expected_hang_ups
    assert report.n_ok == report.n_requests - expected_errors - expected_hang_ups
    assert report.error_samples and report.error_samples[0].startswith("HTTP 500")
    assert sum(w.n_requests for w in report.windows) == report.n_requests and len(report.windows) == 2
    assert report.healthy_at_end and report.slots_idle_at_end is True
    assert len(report.rss_samples) >= 3 and all(s.rss_bytes > 0 for s in report.rss_samples)
    assert lines and "requests=" in lines[0]
    assert report.verdict.passed is (expected_errors == 0 and report.rss.flat)
    text = format_report(report)
    assert "verdict: " in text and f"{report.n_disconnected} deliberate disconnects" in text
    body = json.loads(json.dumps(report_json(report)))
    assert body["schema_version"] == 1 and body["n_requests"] == report.n_requests
    plot_report(report, tmp_path / "soak.png")
    assert (tmp_path / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
