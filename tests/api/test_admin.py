"""The app's lifecycle (/health while loading, failed loads, shutdown), /slots, /metrics, disconnects."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.api.state import app_server_state
from server.app import create_app
from server.engine.engine import Engine, EngineConfig
from server.engine.fake_backend import FakeBackend, FakeBackendConfig
from server.settings import Settings

from .helpers import MODEL, assert_openai_error, raw_post, serve, wait_for

pytestmark = pytest.mark.anyio

HI = [{"role": "user", "content": "hi"}]


async def test_health_is_503_while_loading_then_200() -> None:
    release = threading.Event()
    backend = FakeBackend()

    def slow_factory() -> Engine:
        assert release.wait(timeout=30)
        return Engine(backend, EngineConfig())

    app = create_app(Settings(served_model_name=MODEL), engine_factory=slow_factory)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        response = await client.get("/health")
        assert response.status_code == 503
        assert response.json()["status"] == "loading"
        assert_openai_error(response, 503, code="model_loading")
        assert (await client.get("/v1/models")).status_code == 200  # the id is known before the model
        chat = await client.post("/v1/chat/completions", json={"messages": HI})
        assert_openai_error(chat, 503, code="unavailable")
        assert "loading" in chat.json()["error"]["message"]
        metrics = (await client.get("/metrics")).text
        assert "qwen3_local_model_ready 0.0" in metrics

        release.set()
        await wait_for(lambda: app_server_state(app).status == "ready")
        response = await client.get("/health")
        assert response.status_code == 200 and response.json() == {"status": "ok"}
        assert (await client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2})).status_code == 200
    assert backend.closed  # shutdown stopped the engine


async def test_health_reports_a_download_then_loading_then_ready() -> None:
    backend = FakeBackend()
    reached = [threading.Event() for _ in range(3)]
    go_on = [threading.Event() for _ in range(3)]

    def downloading_factory() -> Engine:  # what build_engine tells the state, step by step
        state = app_server_state(app)
        for bytes_done, step in ((0, 0), (600, 1)):
            state.downloading(bytes_done, 1000)
            reached[step].set()
            assert go_on[step].wait(timeout=30)
        state.downloaded()
        reached[2].set()
        assert go_on[2].wait(timeout=30)
        return Engine(backend, EngineConfig())

    app = create_app(Settings(served_model_name=MODEL), engine_factory=downloading_factory)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        for step, bytes_done in ((0, 0), (1, 600)):
            await wait_for(reached[step].is_set)
            response = await client.get("/health")
            assert response.status_code == 503
            progress = {"bytes_done": bytes_done, "bytes_total": 1000}
            assert response.json() == {"status": "downloading", "progress": progress}
            chat = await client.post("/v1/chat/completions", json={"messages": HI})
            message = assert_openai_error(chat, 503, code="unavailable")["message"]
            assert f"still downloading ({bytes_done} of 1000 bytes)" in message
            go_on[step].set()

        await wait_for(reached[2].is_set)
        loading = await client.get("/health")
        assert loading.json()["status"] == "loading"
        assert_openai_error(loading, 503, code="model_loading")
        go_on[2].set()
        await wait_for(lambda: app_server_state(app).status == "ready")
        assert (await client.get("/health")).json() == {"status": "ok"}


async def test_failed_load_is_reported_by_health() -> None:
    def failing_factory() -> Engine:
        raise OSError("model file is truncated")

    failures: list[str] = []
    app = create_app(Settings(served_model_name=MODEL), engine_factory=failing_factory, on_load_failure=failures.append)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        await wait_for(lambda: app_server_state(app).status != "loading")
        response = await client.get("/health")
        assert response.json()["status"] == "failed"
        assert "model file is truncated" in assert_openai_error(response, 503, code="model_load_failed")["message"]
        assert_openai_error(await client.post("/v1/completions", json={"prompt": "x"}), 503)
        assert failures == ["OSError: model file is truncated"]
        assert app_server_state(app).load_error == failures[0]


async def test_shutdown_while_loading_stops_the_late_engine() -> None:
    release = threading.Event()
    backend = FakeBackend()

    def slow_factory() -> Engine:
        assert release.wait(timeout=30)
        return Engine(backend, EngineConfig())

    app = create_app(Settings(served_model_name=MODEL), engine_factory=slow_factory)
    async with app.router.lifespan_context(app):
        pass
    release.set()
    await wait_for(lambda: backend.closed)
    assert app_server_state(app).status == "stopped"


async def test_chat_template_override_file(tmp_path: Path) -> None:
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}#")
    async with serve(chat_template=str(template)) as served:
        response = await served.client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 1})
        assert response.json()["usage"]["prompt_tokens"] == len("hi#")


async def test_template_out_of_memory_is_a_500_not_a_400(tmp_path: Path) -> None:
    template = tmp_path / "huge.jinja"
    template.write_text("{{ 'x' * 2**62 }}")  # a real MemoryError: 4 EiB is refused before any allocation
    async with serve(chat_template=str(template)) as served:
        response = await served.client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 1})
        assert_openai_error(response, 500, code="internal_error")
        assert (await served.client.get("/health")).status_code == 200  # the server keeps serving


async def test_broken_override_template_fails_the_load(tmp_path: Path) -> None:
    template = tmp_path / "broken.jinja"
    template.write_text("{% for m in messages %}")
    async with serve(chat_template=str(template)) as served:
        response = await served.client.get("/health")
        assert "does not compile" in assert_openai_error(response, 503, code="model_load_failed")["message"]
        assert served.backend.closed


async def test_slots_show_a_running_request() -> None:
    async with serve(FakeBackendConfig(step_delay_s=0.01)) as served:
        idle = (await served.client.get("/slots")).json()
        assert [slot["id"] for slot in idle] == [0, 1, 2, 3]
        assert all(slot["state"] == "idle" and slot["request_id"] is None for slot in idle)
        assert set(idle[0]) == {
            "id",
            "state",
            "request_id",
            "choice_index",
            "n_cached_tokens",
            "n_prompt_tokens",
            "n_generated_tokens",
            "n_drafted",
            "n_accepted",
            "acceptance",
        }
        request = asyncio.create_task(
            served.client.post("/v1/completions", json={"prompt": "abcdef", "max_tokens": 60})
        )
        await wait_for(lambda: served.engine.stats().n_slots_busy == 1)
        busy = [slot for slot in (await served.client.get("/slots")).json() if slot["state"] != "idle"]
        assert len(busy) == 1 and busy[0]["request_id"].startswith("cmpl-")
        assert busy[0]["state"] in ("prefill", "decode") and busy[0]["n_prompt_tokens"] == 6
        assert (await request).status_code == 200


async def test_metrics_parse_and_count() -> None:
    async with serve() as served:
        for _ in range(2):
            response = await served.client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 5})
            assert response.status_code == 200
        streamed = await served.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": True})
        assert streamed.status_code == 200
        await served.client.get("/nowhere")
        text = (await served.client.get("/metrics")).text
        families = {family.name: family for family in text_string_to_metric_families(text)}

        def value(family: str, sample: str | None = None, **labels: str) -> float:
            name = sample or family
            return next(
                s.value
                for s in families[family].samples
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
            )

        http = "qwen3_local_http_requests"
        assert value(http, f"{http}_total", route="/v1/chat/completions", status="200", method="POST") == 2
        assert value(http, f"{http}_total", route="/v1/completions", status="200") == 1
        assert value(http, f"{http}_total", route="unmatched", status="404") == 1
        ttft = "qwen3_local:time_to_first_token_seconds"
        assert value(ttft, f"{ttft}_count", model_name=MODEL) == 3
        itl = "qwen3_local:inter_token_latency_seconds"
        assert value(itl, f"{itl}_count", model_name=MODEL) == (5 - 1) * 2 + (3 - 1)  # gaps between tokens
        assert value("qwen3_local_generated_tokens", "qwen3_local_generated_tokens_total") == 13
        assert value("qwen3_local_slots") == 4
        assert value("qwen3_local_slots_busy") == 0
        assert value("qwen3_local:num_requests_waiting", model_name=MODEL) == 0
        assert value("qwen3_local_decode_errors", "qwen3_local_decode_errors_total") == 0
        assert value("qwen3_local_model_ready") == 1
        assert value("qwen3_local_requests_finished", "qwen3_local_requests_finished_total") == 3


async def test_disconnect_mid_stream_frees_the_slot() -> None:
    async with serve(FakeBackendConfig(step_delay_s=0.01)) as served:
        payload = {"messages": HI, "max_tokens": 200, "stream": True}
        exchange = await raw_post(served.app, "/v1/chat/completions", payload)
        assert await exchange.status() == 200
        assert (await exchange.next_body()).startswith(b"data: ")
        assert served.engine.stats().n_slots_busy == 1
        await exchange.disconnect()
        await wait_for(lambda: served.engine.stats().n_slots_busy == 0)
        assert served.engine.stats().n_generated_tokens < 200
        await wait_for(lambda: served.backend.n_live_samplers() == 0)
        response = await served.client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2})
        assert response.status_code == 200


async def test_disconnect_while_waiting_for_a_full_answer_frees_the_slot() -> None:
    async with serve(FakeBackendConfig(step_delay_s=0.01)) as served:
        exchange = await raw_post(served.app, "/v1/completions", {"prompt": "abc", "max_tokens": 200})
        await wait_for(lambda: served.engine.stats().n_slots_busy == 1)
        await exchange.disconnect()
        await wait_for(lambda: served.engine.stats().n_slots_busy == 0)
        assert served.engine.stats().n_generated_tokens < 200


async def test_disconnect_while_queued_for_a_stream_withdraws_the_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serve(FakeBackendConfig(n_slots=1, step_delay_s=0.01)) as served:
        running = asyncio.create_task(served.client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 60}))
        await wait_for(lambda: served.engine.stats().n_slots_busy == 1)
        queued = await raw_post(served.app, "/v1/chat/completions", {"messages": HI, "stream": True})
        await wait_for(lambda: served.engine.stats().n_requests_waiting == 1)
        await queued.disconnect()  # the app returns cleanly: no exception escapes the request
        await wait_for(lambda: served.engine.stats().n_requests_waiting == 0)
        assert served.engine.stats().n_slots_busy == 1  # the running request is untouched
        assert (await running).status_code == 200
        assert served.engine.stats().n_requests_finished == 1
    assert "unexpected error" not in caplog.text


async def test_plan_endpoint_serves_the_engines_load_report() -> None:
    report = {"model": "fake-model", "plan": {"n_gpu_layers": 0, "kv_type": "f16"}}

    def factory() -> Engine:
        return Engine(FakeBackend(), EngineConfig(), load_report=report)

    app = create_app(Settings(served_model_name=MODEL), engine_factory=factory)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        await wait_for(lambda: app_server_state(app).status == "ready")
        response = await client.get("/plan")
    assert response.status_code == 200
    assert response.json() == report
