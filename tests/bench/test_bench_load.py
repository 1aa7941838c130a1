"""bench.load: SSE parsing, argument checks and the whole client loop against an in-process fake server
(httpx.MockTransport: no sockets)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.load import (
    DEFAULT_PROMPTS_PATH,
    LoadError,
    LoadPlan,
    StreamTally,
    apply_sse_line,
    chat_request_body,
    format_reports,
    json_schema_format,
    load_prompts,
    parse_levels,
    plot_reports,
    requests_for_levels,
    require_loopback,
    result_from_tally,
    run_load,
)
from bench.stats import report_to_json, summarize_level, validate_report_json


def _chunk(content: str | None = None, role: str | None = None, finish: str | None = None) -> str:
    delta: dict[str, str] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    body = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return "data: " + json.dumps(body)


def _usage(n_tokens: int) -> str:
    usage = {"prompt_tokens": 7, "completion_tokens": n_tokens, "total_tokens": 7 + n_tokens}
    return "data: " + json.dumps({"object": "chat.completion.chunk", "choices": [], "usage": usage})


def _fold(lines: list[str]) -> StreamTally:
    tally = StreamTally()
    for index, line in enumerate(lines):
        tally = apply_sse_line(tally, line, float(index))
    return tally


def test_sse_tally_counts_text_chunks_and_prefers_usage() -> None:
    lines = [
        ": keep-alive comment",
        _chunk(role="assistant", content=""),
        _chunk("Hello"),
        "",
        _chunk(" world"),
        _chunk(finish="length"),
        _usage(3),
        "data: [DONE]",
    ]
    tally = _fold(lines)
    assert tally.first_token_at == 2.0
    assert tally.token_chunk_times == (2.0, 4.0)
    assert tally.usage_tokens == 3
    assert tally.done and tally.error is None
    result = result_from_tally(tally, started_at=0.5, finished_at=8.0)
    assert result.ok and result.usage_reported
    assert result.n_output_tokens == 3
    assert result.ttft_s == pytest.approx(1.5)


def test_usage_tells_how_much_of_the_prompt_was_computed() -> None:
    usage = {
        "prompt_tokens": 41,
        "completion_tokens": 2,
        "total_tokens": 43,
        "prompt_tokens_details": {"cached_tokens": 30},
    }
    with_cache = "data: " + json.dumps({"object": "chat.completion.chunk", "choices": [], "usage": usage})
    results = [
        result_from_tally(_fold([_chunk("a"), _chunk("b"), with_cache, "data: [DONE]"]), 0.0, 1.0),
        result_from_tally(_fold([_chunk("a"), _chunk("b"), _usage(2), "data: [DONE]"]), 0.0, 1.0),  # no details
    ]
    assert (results[0].n_prompt_tokens, results[0].n_cached_prompt_tokens) == (41, 30)
    assert (results[1].n_prompt_tokens, results[1].n_cached_prompt_tokens) == (7, None)
    level = summarize_level(1, 2, results)
    assert level.mean_prompt_tokens == pytest.approx(24.0)
    assert level.mean_computed_prompt_tokens == pytest.approx((11 + 7) / 2)  # nothing cached counts whole
    bare = result_from_tally(_fold([_chunk("a"), "data: [DONE]"]), 0.0, 1.0)
    assert summarize_level(1, 1, [bare]).mean_computed_prompt_tokens is None


def test_sse_tally_without_usage_counts_chunks_and_reads_completion_text() -> None:
    text_chunk = "data: " + json.dumps({"object": "text_completion", "choices": [{"index": 0, "text": "a"}]})
    result = result_from_tally(_fold([text_chunk, text_chunk, "data: [DONE]"]), 0.0, 3.0)
    assert result.ok
    assert not result.usage_reported
    assert result.n_output_tokens == 2


def test_sse_errors_and_truncated_streams_become_failed_results() -> None:
    error_line = "data: " + json.dumps({"error": {"message": "decode failed", "type": "server_error"}})
    assert "decode failed" in (_fold([_chunk("a"), error_line]).error or "")
    assert "unparseable" in (_fold(["data: {not json"]).error or "")
    truncated = result_from_tally(_fold([_chunk("a")]), 0.0, 1.0)
    assert not truncated.ok
    assert "[DONE]" in (truncated.error or "")


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080/v1", "http://127.3.2.1:1/v1/", "http://localhost:9/v1", "http://[::1]:80/v1"]
)
def test_loopback_urls_are_accepted_without_trailing_slash(url: str) -> None:
    assert require_loopback(url) == url.rstrip("/")


@pytest.mark.parametrize(
    "url", ["http://10.0.0.1:8080/v1", "http://example.com/v1", "ftp://127.0.0.1/v1", "127.0.0.1:8080", ""]
)
def test_other_urls_are_refused(url: str) -> None:
    with pytest.raises(LoadError):
        require_loopback(url)


def test_levels_and_request_counts() -> None:
    assert parse_levels("1, 4,16") == (1, 4, 16)
    for bad in ("", "0", "1,x", "-2"):
        with pytest.raises(LoadError):
            parse_levels(bad)
    assert requests_for_levels((1, 4, 16), None) == (4, 16, 64)
    assert requests_for_levels((1, 4), 10) == (10, 10)
    with pytest.raises(LoadError):
        requests_for_levels((1,), 0)


def test_bundled_prompts_are_varied(tmp_path: Path) -> None:
    prompts = load_prompts(DEFAULT_PROMPTS_PATH)
    assert len(prompts) >= 16
    assert len(set(prompts)) == len(prompts)
    (tmp_path / "list.json").write_text(json.dumps(["a", "b"]))
    assert load_prompts(tmp_path / "list.json") == ("a", "b")
    (tmp_path / "bad.json").write_text(json.dumps({"prompts": []}))
    with pytest.raises(LoadError):
        load_prompts(tmp_path / "bad.json")
    with pytest.raises(LoadError):
        load_prompts(tmp_path / "missing.json")


def _plan(**overrides: Any) -> LoadPlan:
    values: dict[str, Any] = {
        "base_url": "http://127.0.0.1:9/v1",
        "model": "tiny",
        "prompts": ("p0", "p1", "p2"),
        "max_tokens": 5,
        "concurrency_levels": (1, 4),
        "requests_per_level": (3, 8),
    }
    return LoadPlan(**{**values, **overrides})


def test_request_body_carries_openai_fields_and_llama_cpp_extras() -> None:
    body = chat_request_body(_plan(banned_token_ids=(2,)), "hi", send_extras=True)
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    assert (body["max_tokens"], body["temperature"], body["stream"]) == (5, 0.0, True)
    assert body["stream_options"] == {"include_usage": True}
    assert (body["ignore_eos"], body["n_predict"]) == (True, 5)
    assert body["logit_bias"] == {"2": -100}
    plain = chat_request_body(_plan(), "hi", send_extras=False)
    assert "ignore_eos" not in plain and "n_predict" not in plain and "logit_bias" not in plain


def test_a_json_schema_workload_sends_the_schema_and_no_ignore_eos(tmp_path: Path) -> None:
    # ignore_eos would fight the grammar, which allows only end-of-generation once the JSON is complete.
    schema_path = Path(__file__).resolve().parents[2] / "bench" / "schemas" / "answer.json"
    response_format = json_schema_format(schema_path)
    assert response_format["json_schema"]["name"] == "answer"
    assert response_format["json_schema"]["schema"]["required"] == ["answer", "confidence", "topics", "needs_follow_up"]
    body = chat_request_body(_plan(response_format=response_format), "hi", send_extras=True)
    assert body["response_format"] == response_format
    assert "ignore_eos" not in body and "n_predict" not in body
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(LoadError, match="must hold a JSON schema object"):
        json_schema_format(tmp_path / "list.json")
    with pytest.raises(LoadError, match="cannot read a JSON schema"):
        json_schema_format(tmp_path / "missing.json")


@dataclass
class FakeServer:
    """Streams max_tokens one-word chunks; optionally rejects llama.cpp's extras or fails some requests."""

    reject_extras: bool = False
    send_usage: bool = True
    fail_prompt: str | None = None
    hang_prompt: str | None = None
    bodies: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    async def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        if self.reject_extras and "ignore_eos" in body:
            return httpx.Response(422, json={"error": {"message": "extra field ignore_eos"}})
        if body["messages"][0]["content"] == self.fail_prompt:
            return httpx.Response(500, json={"error": {"message": "decode failed"}})
        if body["messages"][0]["content"] == self.hang_prompt:
            await asyncio.Event().wait()  # never answers; only the level timeout ends it
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0.001)  # let the other clients' requests arrive meanwhile
        self.in_flight -= 1
        lines = [_chunk(role="assistant", content="")]
        lines += [_chunk(f" w{index}") for index in range(body["max_tokens"])]
        lines.append(_chunk(finish="length"))
        if self.send_usage and body.get("stream_options", {}).get("include_usage"):
            lines.append(_usage(body["max_tokens"]))
        lines.append("data: [DONE]")
        stream = "".join(line + "\n\n" for line in lines).encode()
        return httpx.Response(200, content=stream, headers={"content-type": "text/event-stream"})


def _run(plan: LoadPlan, server: FakeServer) -> Any:
    transport = httpx.MockTransport(server.handle)
    return asyncio.run(run_load(plan, "fake", show_progress=False, transport=transport))


def test_run_load_reports_every_level_with_exact_token_counts() -> None:
    server = FakeServer()
    report = _run(_plan(), server)
    assert [level.concurrency for level in report.levels] == [1, 4]
    assert [level.n_requests for level in report.levels] == [3, 8]
    for level in report.levels:
        assert level.n_errors == 0
        assert level.output_tokens == 5 * level.n_ok
        assert level.n_short_outputs == 0
        assert level.usage_reported
        assert level.ttft_p50_ms is not None and level.itl_p50_ms is not None
    assert report.settings.sent_ignore_eos
    assert report.settings.banned_token_ids == ()
    assert server.max_in_flight == 4  # the 4-client level really overlapped, and never went past 4
    timed_prompts = [body["messages"][0]["content"] for body in server.bodies[1:]]  # after the warm-up
    assert timed_prompts[:3] == ["p0", "p1", "p2"]
    assert sorted(timed_prompts[3:]) == sorted(["p0", "p1", "p2"] * 2 + ["p0", "p1"])
    assert validate_report_json(json.loads(json.dumps(report_to_json(report)))) == []


def test_run_load_drops_extras_a_strict_server_refuses_and_counts_chunks_without_usage() -> None:
    server = FakeServer(reject_extras=True, send_usage=False)
    report = _run(_plan(concurrency_levels=(2,), requests_per_level=(4,)), server)
    assert not report.settings.sent_ignore_eos
    (level,) = report.levels
    assert (level.n_ok, level.output_tokens) == (4, 20)
    assert not level.usage_reported
    assert all("ignore_eos" not in body for body in server.bodies[2:])
    assert "refused ignore_eos" in format_reports([report])


def test_run_load_counts_http_errors_per_level() -> None:
    server = FakeServer(fail_prompt="p1")
    report = _run(_plan(concurrency_levels=(2,), requests_per_level=(6,)), server)
    (level,) = report.levels
    assert (level.n_ok, level.n_errors) == (4, 2)
    assert level.error_samples and level.error_samples[0].startswith("HTTP 500")
    table = format_reports([report])
    assert "fake" in table and "HTTP 500" in table


def test_level_timeout_fails_the_requests_still_running() -> None:
    server = FakeServer(hang_prompt="slow")
    plan = _plan(prompts=("p0", "slow"), concurrency_levels=(2,), requests_per_level=(4,), level_timeout_s=0.5)
    (level,) = _run(plan, server).levels
    # worker A: p0, p0, then hangs on the 4th request; worker B hangs on the 2nd.
    assert (level.n_requests, level.n_ok, level.n_errors) == (4, 2, 2)
    assert level.error_samples == ("level timeout after 0.5 s",)


def test_failed_warm_up_is_one_readable_error() -> None:
    with pytest.raises(LoadError, match="warm-up request"):
        _run(_plan(prompts=("boom",)), FakeServer(fail_prompt="boom"))


def test_plot_is_a_png(tmp_path: Path) -> None:
    report = _run(_plan(), FakeServer())
    target = tmp_path / "plot.png"
    plot_reports([report, report], target)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
