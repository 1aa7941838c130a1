"""bench.speculation's arithmetic: ratios are taken within a round, then their median (the machine drifts)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from bench.speculation import (
    END_TO_END,
    GENERATION,
    BenchReport,
    BenchSettings,
    SpeculationBenchError,
    WorkloadResult,
    WorkloadTally,
    format_report,
    repetitive_prompts,
    workloads,
)
from bench.stats import RequestResult


def report_of(*rows: tuple[str, str, int, float]) -> BenchReport:
    """(server, workload, round, tokens/s) rows as a report (10 s each)."""
    results = [
        WorkloadResult(server, workload, round_index, completion_tokens=int(tok_s * 10), seconds=10.0)
        for server, workload, round_index, tok_s in rows
    ]
    return BenchReport(settings={}, results=results)


def test_ratios_pair_the_servers_round_by_round() -> None:
    # Same-round ratios 1.2, 1.2, 1.083: median 1.2. The medians of each server's rounds (130 / 120) would give
    # 1.083, a ratio that no two measurements taken side by side showed.
    report = report_of(
        ("ngram", "quote-1", 0, 120.0), ("off", "quote-1", 0, 100.0),
        ("ngram", "quote-1", 1, 240.0), ("off", "quote-1", 1, 200.0),
        ("ngram", "quote-1", 2, 130.0), ("off", "quote-1", 2, 120.0),
    )  # fmt: skip
    ratios = report.ratios()
    assert ratios["repetitive (quotes): ngram / off (goal >= 1.5)"] == pytest.approx(1.2)
    assert ratios["repetitive (quotes): ngram / llama-server ngram (goal >= 1.0)"] is None, "llama-server not run"
    assert "1.200 (1.083-1.200)" in format_report(report)


def test_a_round_without_the_reference_is_left_out() -> None:
    report = report_of(("ngram", "chat-1", 0, 90.0), ("off", "chat-1", 0, 100.0), ("ngram", "chat-1", 1, 50.0))
    assert report.round_ratios("ngram", "off", "chat-1") == [pytest.approx(0.9)]


def test_the_quotes_and_the_edits_are_separate_workloads() -> None:
    settings = BenchSettings(
        model="m", model_path=Path("m.gguf"), threads=2, parallel=16, ctx_per_slot=1024,
        max_tokens=160, chat_requests=1, chat_streams=(1,), rounds=1, servers=("off",), llama_spec_args=(),
        draft_max=32,
    )  # fmt: skip
    named = {name: prompts for name, prompts, _, _ in workloads(settings)}
    assert named["quote-1"] + named["edit-1"] == repetitive_prompts()
    assert all(prompt.startswith("Repeat the following text exactly") for prompt in named["quote-1"])
    assert not any(prompt.startswith("Repeat") for prompt in named["edit-1"])


def test_generation_speed_leaves_out_each_request_time_to_its_first_token() -> None:
    # Two streamed requests: 11 tokens whose chunks span 0.5 s after a 0.3 s prefill, and 5 tokens spanning
    # 0.2 s. Generation: (10 + 4) tokens in 0.7 s = 20 tok/s; end to end, 16 tokens in the 2 s of wall time.
    first = RequestResult(0.0, 0.9, 0.3, (0.3, 0.5, 0.8), n_output_tokens=11, usage_reported=True)
    second = RequestResult(1.0, 2.0, 1.6, (1.6, 1.8), n_output_tokens=5, usage_reported=True)
    tally = replace(WorkloadTally().plus_request(first).plus_request(second), seconds=2.0)
    result = WorkloadResult(
        "off", "quote-1", 0, tally.completion_tokens, tally.seconds, None, tally.generation_tokens,
        tally.generation_seconds,
    )  # fmt: skip
    assert result.tokens_per_second == pytest.approx(8.0)
    assert result.generation_tokens_per_second == pytest.approx(20.0)
    failed = RequestResult(0.0, 1.0, None, (), n_output_tokens=0, usage_reported=False, error="HTTP 500: boom")
    with pytest.raises(SpeculationBenchError, match="HTTP 500: boom"):
        WorkloadTally().plus_request(failed)


def test_ratios_by_either_measure() -> None:
    rows = [("ngram", 150.0, 3.0), ("off", 100.0, 1.5)]  # (server, end-to-end tok/s, generation speed-up)
    results = [
        WorkloadResult(server, "quote-1", 0, int(tok_s * 10), 10.0, None, 100, 100 / (100.0 * gain))
        for server, tok_s, gain in rows
    ]
    report = BenchReport(settings={}, results=results)
    label = "repetitive (quotes): ngram / off (goal >= 1.5)"
    assert report.ratios(END_TO_END)[label] == pytest.approx(1.5)
    assert report.ratios(GENERATION)[label] == pytest.approx(2.0)
    text = format_report(report)
    assert "ratios, end to end" in text and "ratios, generation" in text
