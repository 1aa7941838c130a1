"""The audit log through the API (the fake backend): every request recorded once with the response's own
usage, rejected ones too; the request id header; content modes; disconnects; the spool and its limit."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.postgres import ThrowawayPostgres
from server.audit.record import AuditRecord
from server.audit.store import AuditStore
from server.audit.writer import AuditWriter
from server.engine.engine import EngineConfig
from server.engine.fake_backend import FakeBackendConfig
from tests.api.helpers import Served, raw_post, serve, sse_payloads, wait_for

pytestmark = pytest.mark.anyio

HI = [{"role": "user", "content": "hi"}]
CHATML_HI = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def _writer(served: Served) -> AuditWriter:
    assert served.state.audit is not None
    return served.state.audit


def _rows(url: str) -> dict[str, dict[str, Any]]:
    store = AuditStore(url)
    try:
        return {row["request_id"]: row for row in store.rows()}
    finally:
        store.close()


def _usage_matches(row: dict[str, Any], usage: dict[str, Any]) -> None:
    assert row["prompt_tokens"] == usage["prompt_tokens"]
    assert row["generated_tokens"] == usage["completion_tokens"]
    assert row["cached_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]


def _streamed(response: httpx.Response) -> tuple[str, dict[str, Any]]:
    payloads = [p for p in sse_payloads(response.text) if isinstance(p, dict)]
    text = "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads if p["choices"])
    return text, payloads[-1]["usage"]


async def test_records_match_the_responses_usage(audit_url: str, tmp_path: Path) -> None:
    async with serve(audit_db=audit_url, data_dir=tmp_path) as served:
        post = served.client.post
        chat = await post("/v1/chat/completions", json={"messages": HI, "max_tokens": 7, "user": "alice", "seed": 3})
        stream = await post(
            "/v1/chat/completions",
            json={"messages": HI, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}},
        )
        completion = await post("/v1/completions", json={"prompt": ["one", "two"], "max_tokens": 4, "n": 2})
        assert _writer(served).flush()
    rows = _rows(audit_url)
    assert len(rows) == 3

    row = rows[chat.headers["x-request-id"]]
    body = chat.json()
    _usage_matches(row, body["usage"])
    assert row["output"] == body["choices"][0]["message"]["content"] and row["prompt"] == CHATML_HI
    assert (row["user"], row["model"], row["endpoint"], row["method"]) == (
        "alice",
        "fake-model",
        "/v1/chat/completions",
        "POST",
    )
    assert (row["status"], row["error_code"], row["finish_reason"]) == (200, None, "length")
    assert json.loads(row["params"])["seed"] == 3 and json.loads(row["params"])["max_tokens"] == 7
    assert row["client"] == "127.0.0.1"
    assert 0 < row["ttft_ms"] <= row["latency_ms"]

    row = rows[stream.headers["x-request-id"]]
    text, usage = _streamed(stream)
    _usage_matches(row, usage)
    assert row["output"] == text and row["status"] == 200 and row["error_code"] is None

    row = rows[completion.headers["x-request-id"]]
    _usage_matches(row, completion.json()["usage"])
    assert row["generated_tokens"] == 16 and json.loads(row["prompt"]) == ["one", "two"]
    assert AuditStore(audit_url).verify() == (3, None)


async def test_rejected_requests_are_recorded_once_with_their_code(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    backend = FakeBackendConfig(n_slots=1, step_delay_s=0.01)
    async with serve(backend, EngineConfig(max_queue=0), audit_db=url, data_dir=tmp_path, api_key="k") as served:
        auth = {"authorization": "Bearer k"}
        post = served.client.post
        responses = {
            "unauthenticated": await post("/v1/chat/completions", json={"messages": HI}),
            "invalid": await post("/v1/chat/completions", json={"messages": "hi"}, headers=auth),
            "unknown model": await post("/v1/chat/completions", json={"model": "x", "messages": HI}, headers=auth),
            "unknown route": await post("/v1/nothing", json={}, headers=auth),
        }
        busy = asyncio.create_task(post("/v1/chat/completions", json={"messages": HI, "max_tokens": 100}, headers=auth))
        await wait_for(lambda: served.engine.stats().n_slots_busy == 1)
        responses["queue full"] = await post("/v1/chat/completions", json={"messages": HI}, headers=auth)
        assert (await busy).status_code == 200
        assert _writer(served).flush()
    rows = _rows(url)
    assert len(rows) == 6
    expected = {
        "unauthenticated": (401, "invalid_api_key"),
        "invalid": (400, "invalid_value"),
        "unknown model": (404, "model_not_found"),
        "unknown route": (404, "not_found"),
        "queue full": (429, "queue_full"),
    }
    for name, (status, code) in expected.items():
        response = responses[name]
        assert response.status_code == status, name
        row = rows[response.headers["x-request-id"]]
        assert (row["status"], row["error_code"]) == (status, code), name
    assert rows[responses["unknown model"].headers["x-request-id"]]["model"] == "x"


async def test_content_kept_as_hashes_or_not_at_all(tmp_path: Path) -> None:
    for mode in ("hashes", "none"):
        url = f"sqlite:///{tmp_path / f'{mode}.sqlite3'}"
        async with serve(audit_db=url, data_dir=tmp_path, audit_content=mode) as served:
            response = await served.client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 4})
            assert _writer(served).flush()
        row = _rows(url)[response.headers["x-request-id"]]
        output = response.json()["choices"][0]["message"]["content"]
        if mode == "hashes":
            assert row["prompt"] == "sha256:" + hashlib.sha256(CHATML_HI.encode()).hexdigest()
            assert row["output"] == "sha256:" + hashlib.sha256(output.encode()).hexdigest()
        else:
            assert row["prompt"] is None and row["output"] is None
        assert row["generated_tokens"] == 4


async def test_a_client_disconnect_mid_stream_is_recorded(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    async with serve(FakeBackendConfig(step_delay_s=0.01), audit_db=url, data_dir=tmp_path) as served:
        payload = {"messages": HI, "max_tokens": 200, "stream": True}
        exchange = await raw_post(served.app, "/v1/chat/completions", payload)
        message = await asyncio.wait_for(exchange.sent.get(), timeout=10)
        request_id = dict(message["headers"])[b"x-request-id"].decode()
        assert (await exchange.next_body()).startswith(b"data: ")
        await exchange.disconnect()
        assert _writer(served).flush()
    row = _rows(url)[request_id]
    assert row["error_code"] == "client_disconnected" and row["status"] == 200
    assert 0 < row["generated_tokens"] < 200 and row["output"]


async def test_a_full_spool_answers_503_when_audit_is_required(tmp_path: Path) -> None:
    unreachable = "postgresql://postgres@127.0.0.1:1/none"
    spool = tmp_path / "audit-spool.jsonl"
    big = AuditRecord(
        request_id="old", time="2026-01-01T00:00:00+00:00", method="POST", endpoint="/", prompt="x" * 2**20
    )
    spool.write_text(big.to_json() + "\n")
    async with serve(audit_db=unreachable, data_dir=tmp_path, audit_spool_mib=1) as served:
        refused = await served.client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "audit_unavailable"
        assert refused.headers["x-request-id"] and refused.headers["retry-after"]
        assert (await served.client.get("/health")).status_code == 200  # probes stay answered
    async with serve(audit_db=unreachable, data_dir=tmp_path, audit_spool_mib=1, audit_required=False) as served:
        served_anyway = await served.client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2})
        assert served_anyway.status_code == 200
        assert _writer(served).flush()
    spooled = [AuditRecord.from_json(line).request_id for line in spool.read_text().splitlines()]
    assert spooled == ["old", served_anyway.headers["x-request-id"]]


async def test_killing_postgresql_mid_run_loses_nothing(tmp_path: Path) -> None:
    database = ThrowawayPostgres()
    database.start()
    try:
        url = database.new_database()
        async with serve(FakeBackendConfig(step_delay_s=0.001), audit_db=url, data_dir=tmp_path) as served:
            writer = _writer(served)

            async def ask(index: int) -> str:
                payload: dict[str, Any] = {"messages": HI, "max_tokens": 3, "user": f"u{index}"}
                if index % 2:
                    payload |= {"stream": True}
                response = await served.client.post("/v1/chat/completions", json=payload)
                assert response.status_code == 200
                return response.headers["x-request-id"]

            sent = [await ask(index) for index in range(5)]
            assert writer.flush() and len(_rows(url)) == 5
            database.kill()  # as a crash: no clean shutdown
            sent += [await ask(index) for index in range(5, 12)]  # served while the database is down
            assert writer.flush()
            assert not writer.db_available and writer.spool_path.exists()
            assert len(writer.spool_path.read_text().splitlines()) == 7
            database.start()
            await wait_for(lambda: not writer.spool_path.exists(), timeout_s=30)
            sent += [await ask(index) for index in range(12, 14)]
            assert writer.flush()
        rows = list(AuditStore(url).rows())
        assert [row["request_id"] for row in rows] == sent
        assert [row["seq"] for row in rows] == list(range(1, 15))
        assert AuditStore(url).verify() == (14, None)
    finally:
        database.close()


async def test_embeddings_are_recorded_with_their_usage(tmp_path: Path) -> None:
    from tests.api.test_embeddings import serve_embeddings

    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    async with serve_embeddings(audit_db=url, data_dir=tmp_path) as served:
        response = await served.client.post("/v1/embeddings", json={"input": ["hello", "world"], "user": "dan"})
        assert response.status_code == 200
        assert _writer(served).flush()
    row = _rows(url)[response.headers["x-request-id"]]
    assert row["prompt_tokens"] == response.json()["usage"]["prompt_tokens"]
    assert (row["endpoint"], row["user"], row["status"]) == ("/v1/embeddings", "dan", 200)
    assert json.loads(row["prompt"]) == ["hello", "world"] and row["output"] is None


async def test_a_client_disconnect_before_a_full_answer_is_recorded(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    async with serve(FakeBackendConfig(step_delay_s=0.01), audit_db=url, data_dir=tmp_path) as served:
        exchange = await raw_post(served.app, "/v1/chat/completions", {"messages": HI, "max_tokens": 200})
        await wait_for(lambda: served.engine.stats().n_slots_busy == 1)
        await exchange.disconnect()
        assert _writer(served).flush()
    (row,) = _rows(url).values()
    assert (row["status"], row["error_code"]) == (499, "client_disconnected")
