"""bench.speculation's arithmetic: ratios are taken within a round, then their median (the machine drifts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.speculation import (
    BenchReport,
    BenchSettings,
    WorkloadResult,
    format_report,
    repetitive_prompts,
    workloads,
)


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
