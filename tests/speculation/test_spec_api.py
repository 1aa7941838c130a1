"""Speculation through the API on the fake backend: the per-request opt-out, /metrics and /slots."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.api.state import app_server_state
from server.app import create_app
from server.engine.engine import Engine, EngineConfig
from server.engine.fake_backend import FakeBackend, FakeBackendConfig
from server.engine.speculation import NgramDrafter, SpeculationConfig
from server.settings import Settings
from tests.api.helpers import wait_for

pytestmark = pytest.mark.anyio

SCRIPT = "one two, one two, one two, one two, one two, one two, one two, one two."


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def serve_speculating() -> AsyncIterator[httpx.AsyncClient]:
    backend = FakeBackend(FakeBackendConfig(script=SCRIPT, n_ctx_per_slot=512))
    config = EngineConfig(speculation=SpeculationConfig(draft_max=6, draft_min=1))
    engine = Engine(backend, config, drafter=NgramDrafter())
    app = create_app(Settings(served_model_name="fake-model", spec_type="ngram"), engine_factory=lambda: engine)
    async with app.router.lifespan_context(app):
        await wait_for(lambda: app_server_state(app).status != "loading")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
            yield client


async def spec_counters(client: httpx.AsyncClient) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    wanted = {"qwen3_local_spec_draft_tokens", "qwen3_local_spec_accepted_tokens", "qwen3_local_spec_acceptance_rate"}
    return {
        family.name: family.samples[0].value
        for family in text_string_to_metric_families(text)
        if family.name in wanted and family.samples
    }


async def test_a_repetitive_answer_is_drafted_and_the_text_is_unchanged() -> None:
    async with serve_speculating() as client:
        response = await client.post("/v1/completions", json={"prompt": "say it", "max_tokens": 60})
        assert response.json()["choices"][0]["text"] == SCRIPT[:60]
        counters = await spec_counters(client)
        assert counters["qwen3_local_spec_accepted_tokens"] > 0
        assert 0 < counters["qwen3_local_spec_acceptance_rate"] <= 1
        slots = (await client.get("/slots")).json()
        assert slots[0]["n_drafted"] > 0 and 0 < slots[0]["acceptance"] <= 1
        assert slots[1]["n_drafted"] == 0 and slots[1]["acceptance"] is None


async def test_a_request_may_opt_out() -> None:
    async with serve_speculating() as client:
        body = {"prompt": "say it", "max_tokens": 60, "speculative": False}
        response = await client.post("/v1/completions", json=body)
        assert response.json()["choices"][0]["text"] == SCRIPT[:60]
        assert (await spec_counters(client))["qwen3_local_spec_draft_tokens"] == 0
        response = await client.post("/v1/completions", json={**body, "speculative": "sometimes"})
        assert response.status_code == 400 and response.json()["error"]["param"] == "speculative"
