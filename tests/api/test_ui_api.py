"""The web UI's JSON endpoints (server/api/ui.py), in-process over the fake backend: /ui/api/whoami says who
the caller is and which scopes it has; /ui/api/stats (admin) is the dashboard's snapshot, whose numbers follow
the engine and the request histograms."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import pytest

from server.api.ui import histogram_quantile
from server.app import create_app
from server.auth.keys import add_key
from server.auth.principal import Limits
from server.engine.engine import Engine, EngineConfig
from server.engine.fake_backend import FakeBackendConfig
from server.metrics import GpuReading, Metrics
from server.settings import Settings

from .helpers import assert_openai_error, serve, wait_for

pytestmark = pytest.mark.anyio

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "ignore_eos": True}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_whoami_without_auth_is_anonymous_with_every_scope(tmp_path: Path) -> None:
    async with serve(data_dir=tmp_path / "data") as served:
        answer = await served.client.get("/ui/api/whoami")
        assert answer.status_code == 200
        assert answer.json() == {"name": "anonymous", "scopes": ["admin", "inference"]}


async def test_whoami_names_the_key_and_its_scopes_and_needs_a_key(tmp_path: Path) -> None:
    keys = tmp_path / "data" / "keys.json"
    user = add_key(keys, "alice", ("inference",), Limits())
    ops = add_key(keys, "ops", ("admin",), Limits())
    async with serve(data_dir=tmp_path / "data") as served:
        client = served.client
        assert (await client.get("/ui/api/whoami", headers=bearer(user))).json() == {
            "name": "alice",
            "scopes": ["inference"],
        }
        assert (await client.get("/ui/api/whoami", headers=bearer(ops))).json() == {"name": "ops", "scopes": ["admin"]}
        assert_openai_error(await client.get("/ui/api/whoami"), 401, code="invalid_api_key")
        assert_openai_error(await client.get("/ui/api/whoami", headers=bearer("wrong")), 401, code="invalid_api_key")
        # the stats are admin data: an inference-only key may not read them
        assert_openai_error(await client.get("/ui/api/stats", headers=bearer(user)), 403, code="insufficient_scope")
        assert (await client.get("/ui/api/stats", headers=bearer(ops))).status_code == 200


async def test_stats_follow_the_engine_and_the_request_histograms(tmp_path: Path) -> None:
    async with serve(FakeBackendConfig(n_slots=2, step_delay_s=0.01), data_dir=tmp_path / "data") as served:
        client = served.client
        first = (await client.get("/ui/api/stats")).json()
        assert first["status"] == "ready" and first["model"] == "fake-model"
        assert first["slots"] == {"total": 2, "busy": 0} and first["queue"] == 0
        assert first["generated_tokens"] == 0 and first["tokens_per_second"] is None  # no earlier reading
        assert first["ttft_seconds"] == {"p50": None, "p95": None, "count": 0}
        assert first["ram"]["total_bytes"] > first["ram"]["used_bytes"] > 0 and first["ram"]["process_bytes"] > 0
        assert isinstance(first["gpus"], list)
        assert first["history"]["points"][-1]["t"] == 0

        # 5 requests on 2 slots: while they run, slots are busy and some wait
        requests = [asyncio.create_task(client.post("/v1/chat/completions", json=CHAT)) for _ in range(5)]
        seen_busy = seen_queue = 0
        while not all(task.done() for task in requests):
            during = (await client.get("/ui/api/stats")).json()
            seen_busy = max(seen_busy, during["slots"]["busy"])
            seen_queue = max(seen_queue, during["queue"])
            await asyncio.sleep(0.01)
        assert [(await task).status_code for task in requests] == [200] * 5
        assert seen_busy == 2 and seen_queue >= 1

        await asyncio.sleep(1.0)  # the rate spans at least a second
        after = (await client.get("/ui/api/stats")).json()
        assert after["generated_tokens"] == 5 * 8
        assert after["tokens_per_second"] > 0
        assert after["decode_tokens_per_second"] > 0
        ttft, itl = after["ttft_seconds"], after["inter_token_latency_seconds"]
        assert ttft["count"] == 5 and 0 < ttft["p50"] <= ttft["p95"]
        assert itl["count"] == 5 * 7 and 0 < itl["p50"] <= itl["p95"]
        engine = served.engine.stats()
        assert after["prompt_cache"] == {"hits": engine.n_prompt_cache_hits, "misses": engine.n_prompt_cache_misses}
        points = after["history"]["points"]
        assert len(points) >= 2 and [p["t"] for p in points] == sorted(p["t"] for p in points)
        assert any(p["tokens_per_second"] for p in points)


async def test_stats_while_loading_say_so_without_engine_numbers(tmp_path: Path) -> None:
    release = threading.Event()

    def never() -> Engine:
        release.wait(timeout=30)
        raise RuntimeError("stop")

    app = create_app(Settings(served_model_name="m", data_dir=tmp_path / "data"), engine_factory=never)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        answer = (await client.get("/ui/api/stats")).json()
        release.set()
    assert answer["status"] == "loading" and answer["tokens_per_second"] is None
    assert answer["slots"] == {"total": 0, "busy": 0} and answer["history"]["points"] == []


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = ((0.1, 0.0), (0.2, 10.0), (0.4, 20.0), (float("inf"), 20.0))
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.2)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.15)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.3)
    assert histogram_quantile(0.5, ((1.0, 0.0), (float("inf"), 0.0))) is None
    assert histogram_quantile(0.99, ((1.0, 1.0), (float("inf"), 4.0))) == 1.0  # in +Inf: the largest bound


async def test_stats_count_prompt_cache_hits_and_misses(tmp_path: Path) -> None:
    budget = 1000 * FakeBackendConfig().state_bytes_per_token
    async with serve(FakeBackendConfig(n_slots=1), EngineConfig(prompt_cache_bytes=budget)) as served:
        client = served.client

        async def complete(prompt: str) -> None:
            answer = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
            assert answer.status_code == 200, answer.text

        def stashes() -> int:
            return sum(op.kind == "stash" for op in served.backend.ops)

        first, second = "alpha conversation, with enough text to keep", "bravo conversation, with enough text to keep"
        await complete(first)
        await wait_for(lambda: stashes() == 1)
        await complete(second)  # the slot now holds bravo; alpha is only in the prompt cache
        await wait_for(lambda: stashes() == 2)
        await complete(first + " and more")  # a hit
        stats = (await client.get("/ui/api/stats")).json()
    assert stats["prompt_cache"] == {"hits": 1, "misses": 2}


async def test_stats_report_each_gpu_as_the_metrics_read_it(tmp_path: Path) -> None:
    gpus = [
        GpuReading(0, "NVIDIA H200", 40 << 30, 141 << 30, 0.75, 50.0, 300.0),
        GpuReading(1, "NVIDIA RTX 4060 Ti", 15 << 30, 16 << 30, None, None, None),  # no utilisation (MIG)
    ]
    async with serve(data_dir=tmp_path / "data") as served:
        state = served.state
        # two GPUs, as NVML reads them
        state.metrics = Metrics(state.engine_stats, "fake-model", read_gpus=lambda: gpus)
        stats = (await served.client.get("/ui/api/stats")).json()
    assert stats["gpus"] == [
        {
            "index": 0,
            "name": "NVIDIA H200",
            "memory_used_bytes": 40 << 30,
            "memory_total_bytes": 141 << 30,
            "utilization_ratio": 0.75,
        },
        {
            "index": 1,
            "name": "NVIDIA RTX 4060 Ti",
            "memory_used_bytes": 15 << 30,
            "memory_total_bytes": 16 << 30,
            "utilization_ratio": None,
        },
    ]
