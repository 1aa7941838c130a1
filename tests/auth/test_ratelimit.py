"""Per-principal requests and tokens per minute: 429 with Retry-After, x-ratelimit-* headers on every answer."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from server.auth.keys import revoke_key
from server.auth.ratelimit import estimated_tokens, reset_text
from tests.api.helpers import assert_openai_error, serve, sse_payloads, wait_for
from tests.auth.conftest import bearer, make_key

pytestmark = pytest.mark.anyio

CHAT = {"messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 40}  # ~10 + 40 = 50 tokens


async def test_requests_per_minute(tmp_path: Path, keys_file: Path) -> None:
    key = make_key(keys_file, "alice", rpm=2)
    other = make_key(keys_file, "bob", rpm=2)
    async with serve(data_dir=tmp_path / "data") as served:
        remaining = []
        for _ in range(2):
            response = await served.client.get("/v1/models", headers=bearer(key))
            assert response.status_code == 200
            assert response.headers["x-ratelimit-limit-requests"] == "2"
            assert response.headers["x-ratelimit-reset-requests"].endswith("s")
            remaining.append(response.headers["x-ratelimit-remaining-requests"])
        assert remaining == ["1", "0"]
        refused = await served.client.get("/v1/models", headers=bearer(key))
        error = assert_openai_error(refused, 429, code="rate_limit_exceeded")
        assert "alice" in error["message"] and "2 requests per minute" in error["message"]
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert (await served.client.get("/v1/models", headers=bearer(other))).status_code == 200  # per key


async def test_tokens_per_minute_charge_prompt_and_max_tokens(tmp_path: Path, keys_file: Path) -> None:
    key = make_key(keys_file, "alice", tpm=120)
    async with serve(data_dir=tmp_path / "data") as served:
        first = await served.client.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-tokens"] == "120"
        assert first.headers["x-ratelimit-remaining-tokens"] == "70"
        assert "x-ratelimit-limit-requests" not in first.headers  # no requests limit: nothing to report
        streamed = await served.client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=bearer(key))
        assert streamed.status_code == 200 and sse_payloads(streamed.text)[-1] == "[DONE]"
        assert streamed.headers["x-ratelimit-remaining-tokens"] == "20"  # streams carry the headers too
        refused = await served.client.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
        assert_openai_error(refused, 429, code="rate_limit_exceeded")
        assert "retry-after" in refused.headers and refused.headers["x-ratelimit-remaining-tokens"] == "20"
        small = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}  # 11 tokens still fit
        assert (await served.client.post("/v1/chat/completions", json=small, headers=bearer(key))).status_code == 200


async def test_a_request_larger_than_the_whole_budget_says_so(tmp_path: Path, keys_file: Path) -> None:
    key = make_key(keys_file, "alice", tpm=30)
    async with serve(data_dir=tmp_path / "data") as served:
        refused = await served.client.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
        error = assert_openai_error(refused, 429, code="rate_limit_exceeded")
        assert "more than the 30 tokens per minute" in error["message"]


async def test_server_defaults_apply_to_keys_without_limits_and_to_anonymous(tmp_path: Path, keys_file: Path) -> None:
    async with serve(data_dir=tmp_path / "data", rate_limit_rpm=1) as served:
        assert (await served.client.get("/v1/models")).headers["x-ratelimit-limit-requests"] == "1"
        assert_openai_error(await served.client.get("/v1/models"), 429)
    key = make_key(keys_file, "alice")
    own = make_key(keys_file, "bob", rpm=5)
    async with serve(data_dir=tmp_path / "data", rate_limit_rpm=1) as served:
        assert (await served.client.get("/v1/models", headers=bearer(key))).headers["x-ratelimit-limit-requests"] == "1"
        assert (await served.client.get("/v1/models", headers=bearer(own))).headers["x-ratelimit-limit-requests"] == "5"


async def test_sighup_swaps_keys_and_limits_in_process(tmp_path: Path, keys_file: Path) -> None:
    old = make_key(keys_file, "old")
    async with serve(data_dir=tmp_path / "data") as served:
        assert (await served.client.get("/v1/models", headers=bearer(old))).status_code == 200
        revoke_key(keys_file, "old")
        new = make_key(keys_file, "new", rpm=1)
        before = served.app.state.auth.snapshot
        os.kill(os.getpid(), signal.SIGHUP)  # the handler runs on this loop
        await wait_for(lambda: served.app.state.auth.snapshot is not before)
        assert_openai_error(await served.client.get("/v1/models", headers=bearer(old)), 401)
        assert (await served.client.get("/v1/models", headers=bearer(new))).status_code == 200
        assert_openai_error(await served.client.get("/v1/models", headers=bearer(new)), 429)
        keys_file.write_text("{broken")  # a bad file keeps the previous snapshot rather than opening up
        snapshot = served.app.state.auth.snapshot
        served.app.state.auth.reload()
        assert served.app.state.auth.snapshot is snapshot


def test_estimates_and_reset_format() -> None:
    assert estimated_tokens({"prompt": [1, 2, 3], "max_tokens": 5}) == 8
    assert estimated_tokens({"input": ["abcd", "abcdefgh"]}) == 3
    assert estimated_tokens({"messages": [{"role": "user", "content": [{"type": "text", "text": "abcd"}]}]}) == 1
    assert estimated_tokens({"messages": [], "max_completion_tokens": 7}) == 7
    assert estimated_tokens("not a body") == 0
    assert [reset_text(s) for s in (0.25, 1.0, 58.2, 59.5, 361)] == ["250ms", "1s", "59s", "1m0s", "6m1s"]
