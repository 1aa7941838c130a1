"""Several models in one app (fake backends): routing by id and alias, 404, /v1/models states, load on demand,
keep_alive (on an injected clock), LRU eviction, the bounded wait for memory, admin load/unload, /health and
/metrics per model."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api.helpers import assert_openai_error, wait_for
from tests.auth.conftest import bearer, make_key
from tests.fleet.helpers import HI, Builder, serve_fleet

pytestmark = pytest.mark.anyio

TWO = [{"model": "a", "aliases": ["alpha"], "parallel": 2}, {"model": "b", "id": "bee", "aliases": ["coder"]}]


async def test_every_model_is_routable_by_id_and_alias_and_others_get_404() -> None:
    async with serve_fleet(TWO, preload=["all"]) as fleet:
        await wait_for(lambda: fleet.status("bee") == "ready")
        for name, model_id in (("a", "a"), ("alpha", "a"), ("bee", "bee"), ("coder", "bee")):
            response = await fleet.chat(name)
            assert response.status_code == 200, response.text
            assert response.json()["model"] == model_id
        default = await fleet.client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2})
        assert default.json()["model"] == "a"  # no model: the first one
        assert fleet.builder.latest("a").n_decode_calls > 0 and fleet.builder.latest("bee").n_decode_calls > 0
        error = assert_openai_error(await fleet.chat("gpt-4"), 404, param="model", code="model_not_found")
        assert "'a'" in error["message"] and "'bee'" in error["message"]
        assert (await fleet.client.get("/v1/models/coder")).json()["id"] == "bee"
        assert_openai_error(await fleet.client.get("/v1/models/nope"), 404, param="model")


async def test_models_list_their_state_and_a_request_loads_an_unloaded_model() -> None:
    builder = Builder(gates={"bee": threading.Event()})
    async with serve_fleet(TWO, builder=builder) as fleet:
        listing = (await fleet.client.get("/v1/models")).json()
        assert listing["object"] == "list"
        cards = {card["id"]: card for card in listing["data"]}
        assert cards["a"]["state"] == "loaded" and cards["a"]["context_length"] == 256  # the fake's n_ctx_per_slot
        assert cards["bee"]["state"] == "unloaded" and cards["bee"]["aliases"] == ["coder"]
        assert {"object", "created", "owned_by"} <= set(cards["bee"])

        request = asyncio.create_task(fleet.chat("coder"))  # waits for the load
        await wait_for(lambda: fleet.status("bee") == "loading")
        cards = {card["id"]: card for card in (await fleet.client.get("/v1/models")).json()["data"]}
        assert cards["bee"]["state"] == "loading"
        assert not request.done()
        builder.gates["bee"].set()
        response = await request
        assert response.status_code == 200 and response.json()["model"] == "bee"
        cards = {card["id"]: card for card in (await fleet.client.get("/v1/models")).json()["data"]}
        assert cards["bee"]["state"] == "loaded"


async def test_a_stream_to_a_model_loaded_on_demand_starts_once_it_serves() -> None:
    async with serve_fleet(TWO) as fleet:
        body = {"model": "bee", "messages": HI, "max_tokens": 3, "stream": True}
        response = await fleet.client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200
        assert response.text.rstrip().endswith("data: [DONE]")
        assert fleet.status("bee") == "ready"


async def test_keep_alive_unloads_an_idle_model_and_frees_its_engine() -> None:
    async with serve_fleet([{"model": "a"}, {"model": "b", "keep_alive": "5m"}]) as fleet:
        assert (await fleet.chat("b")).status_code == 200
        backend = fleet.builder.latest("b")
        fleet.clock.now += 299
        assert await fleet.state.fleet.reap() == []
        fleet.clock.now += 2
        assert await fleet.state.fleet.reap() == ["b"]
        assert fleet.status("b") == "unloaded" and backend.closed
        assert fleet.status("a") == "ready"  # preloaded: kept forever by default
        fleet.clock.now += 10**6
        assert await fleet.state.fleet.reap() == []
        assert (await fleet.chat("b")).status_code == 200  # loads again
        assert len(fleet.builder.backends["b"]) == 2


async def test_a_request_keep_alive_overrides_the_model_s() -> None:
    async with serve_fleet([{"model": "a"}, {"model": "b"}]) as fleet:
        assert (await fleet.chat("b", keep_alive=0)).status_code == 200
        await wait_for(lambda: fleet.status("b") == "unloaded")
        assert fleet.builder.latest("b").closed
        assert (await fleet.chat("b", keep_alive=-1)).status_code == 200
        fleet.clock.now += 10**6
        assert await fleet.state.fleet.reap() == []
        assert (await fleet.chat("b", keep_alive="10s")).status_code == 200
        fleet.clock.now += 11
        assert await fleet.state.fleet.reap() == ["b"]
        error = assert_openai_error(await fleet.chat("a", keep_alive="soon"), 400, param="keep_alive")
        assert "duration" in error["message"]


async def test_a_model_that_does_not_fit_evicts_the_least_recently_used_idle_one() -> None:
    entries = [{"model": "a"}, {"model": "b"}, {"model": "c"}]
    async with serve_fleet(entries, sizes={"a": 100, "b": 100, "c": 100}, budget=250) as fleet:
        assert (await fleet.chat("b")).status_code == 200  # a and b fit
        fleet.clock.now += 1
        assert (await fleet.chat("a")).status_code == 200  # a is now the more recently used
        fleet.clock.now += 1
        assert (await fleet.chat("c")).status_code == 200  # evicts b, the least recently used
        assert fleet.status("b") == "unloaded" and fleet.builder.latest("b").closed
        assert fleet.status("a") == "ready" and fleet.status("c") == "ready"


async def test_with_no_idle_model_to_evict_the_request_waits_then_gets_503_with_retry_after() -> None:
    builder = Builder(step_delay_s=0.02)
    async with serve_fleet(
        [{"model": "a"}, {"model": "b"}], sizes={"a": 100, "b": 100}, budget=150, builder=builder, load_wait_s=0.2
    ) as fleet:
        busy = asyncio.create_task(fleet.chat("a", max_tokens=200, ignore_eos=True))  # holds a for ~4 s
        await wait_for(lambda: fleet.state.fleet.slots["a"].in_flight == 1)
        response = await fleet.chat("b")
        assert_openai_error(response, 503, code="model_overloaded")
        assert int(response.headers["retry-after"]) >= 1
        assert fleet.status("b") == "unloaded"
        busy.cancel()


async def test_a_waiting_request_loads_its_model_once_the_busy_one_goes_idle() -> None:
    builder = Builder(step_delay_s=0.02)
    async with serve_fleet(
        [{"model": "a"}, {"model": "b"}], sizes={"a": 100, "b": 100}, budget=150, builder=builder, load_wait_s=20
    ) as fleet:
        busy = asyncio.create_task(fleet.chat("a", max_tokens=10, ignore_eos=True))
        await wait_for(lambda: fleet.state.fleet.slots["a"].in_flight == 1)
        waiting = asyncio.create_task(fleet.chat("b"))
        assert (await busy).status_code == 200
        assert (await waiting).status_code == 200
        assert fleet.status("a") == "unloaded" and fleet.status("b") == "ready"


async def test_a_model_bigger_than_the_budget_is_a_503_that_says_so() -> None:
    async with serve_fleet([{"model": "a"}, {"model": "b"}], sizes={"a": 10, "b": 1000}, budget=100) as fleet:
        error = assert_openai_error(await fleet.chat("b"), 503)
        assert "budget" in error["message"]


async def test_requests_to_two_models_run_at_the_same_time() -> None:
    builder = Builder(step_delay_s=0.01)
    async with serve_fleet(TWO, builder=builder, preload=["all"]) as fleet:
        await wait_for(lambda: fleet.status("bee") == "ready")
        engines = [fleet.state.fleet.slots[model_id].engine for model_id in ("a", "bee")]
        both_busy = threading.Event()
        requests = [
            asyncio.create_task(fleet.chat(model_id, max_tokens=100, ignore_eos=True)) for model_id in ("a", "bee")
        ]

        def busy() -> bool:
            if all(engine is not None and engine.stats().n_slots_busy == 1 for engine in engines):
                both_busy.set()
            return both_busy.is_set() or all(request.done() for request in requests)

        await wait_for(busy)
        assert both_busy.is_set()  # each model's engine decoding its own request at once
        assert [(await request).status_code for request in requests] == [200, 200]


async def test_admin_load_and_unload_need_the_admin_scope(tmp_path: Path) -> None:
    keys_file = tmp_path / "data" / "keys.json"
    user = make_key(keys_file, "user", "inference")
    ops = make_key(keys_file, "ops", "admin")
    async with serve_fleet(TWO, data_dir=tmp_path / "data") as fleet:
        assert_openai_error(await fleet.client.post("/models/bee/load"), 401, code="invalid_api_key")
        forbidden = await fleet.client.post("/models/bee/load", headers=bearer(user))
        assert_openai_error(forbidden, 403, code="insufficient_scope")
        loaded = await fleet.client.post("/models/coder/load", headers=bearer(ops))
        assert loaded.status_code == 200 and loaded.json()["state"] == "loaded"
        assert fleet.status("bee") == "ready"
        backend = fleet.builder.latest("bee")
        unloaded = await fleet.client.post("/models/bee/unload", headers=bearer(ops))
        assert unloaded.status_code == 200 and unloaded.json()["state"] == "unloaded"
        assert backend.closed
        missing = await fleet.client.post("/models/nope/load", headers=bearer(ops))
        assert_openai_error(missing, 404, param="model")


async def test_health_is_200_while_any_model_is_ready_and_lists_each() -> None:
    builder = Builder(gates={"a": threading.Event()})
    async with serve_fleet(TWO, builder=builder, wait_for_default=False) as fleet:
        response = await fleet.client.get("/health")  # the default model still loading, the other unloaded
        assert response.status_code == 503
        assert response.json()["models"] == {"a": {"status": "loading"}, "bee": {"status": "unloaded"}}
        assert_openai_error(response, 503, code="no_model_ready")
        builder.gates["a"].set()
        await wait_for(lambda: fleet.status("a") == "ready")
        response = await fleet.client.get("/health")
        assert response.status_code == 200
        assert response.json() == {"status": "ok", "models": {"a": {"status": "ready"}, "bee": {"status": "unloaded"}}}


async def test_metrics_label_every_model_series_by_model() -> None:
    async with serve_fleet(TWO) as fleet:
        assert (await fleet.chat("a")).status_code == 200
        text = (await fleet.client.get("/metrics")).text
    found = {family.name: family for family in text_string_to_metric_families(text)}
    ready = {sample.labels["model"]: sample.value for sample in found["qwen3_local_model_ready"].samples}
    assert ready == {"a": 1, "bee": 0}
    assert {sample.labels["model"] for sample in found["qwen3_local_slots"].samples} == {"a"}
    success = found["qwen3_local:request_success"].samples
    assert {sample.labels["model_name"] for sample in success if sample.name.endswith("_total")} == {"a"}


async def test_ui_stats_and_plan_take_a_model() -> None:
    async with serve_fleet(TWO, preload=["all"]) as fleet:
        await wait_for(lambda: fleet.status("bee") == "ready")
        assert (await fleet.chat("bee")).status_code == 200
        stats = (await fleet.client.get("/ui/api/stats", params={"model": "coder"})).json()
        assert stats["model"] == "bee" and stats["slots"]["total"] == 4
        default = (await fleet.client.get("/ui/api/stats")).json()
        assert default["model"] == "a" and default["slots"]["total"] == 2
        assert (await fleet.client.get("/plan", params={"model": "bee"})).status_code == 200
        assert_openai_error(await fleet.client.get("/plan", params={"model": "x"}), 404, param="model")


async def test_tokenize_takes_a_model_and_loads_it_on_demand() -> None:
    async with serve_fleet(TWO) as fleet:
        response = await fleet.client.post("/tokenize", params={"model": "coder"}, json={"content": "hi"})
        assert response.status_code == 200 and response.json()["tokens"] == [ord("h"), ord("i")]
        assert fleet.status("bee") == "ready"
        detokenized = await fleet.client.post("/detokenize", params={"model": "bee"}, json={"tokens": [104, 105]})
        assert detokenized.json() == {"content": "hi"}
        assert_openai_error(
            await fleet.client.post("/tokenize", params={"model": "x"}, json={"content": "hi"}), 404, param="model"
        )
