"""/metrics shows the prompt cache: its bytes, budget and entries, and its hits, misses, evictions and skips."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.engine.engine import EngineConfig
from server.engine.fake_backend import FakeBackendConfig

from .helpers import Served, serve, wait_for

pytestmark = pytest.mark.anyio

TOKEN_BYTES = FakeBackendConfig().state_bytes_per_token


async def scrape(served: Served) -> dict[str, float]:
    text = (await served.client.get("/metrics")).text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("qwen3_local_prompt_cache")
        for sample in family.samples
    }


async def complete(served: Served, prompt: str) -> None:
    response = await served.client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
    assert response.status_code == 200, response.text


def n_stashes(served: Served) -> int:
    return sum(op.kind == "stash" for op in served.backend.ops)


async def test_metrics_count_the_prompt_cache() -> None:
    # three conversations of 45 cached tokens (prompt + the generated token fed back) share no prefix: the cache
    # holds two, the third's stash evicts the first
    budget = 100 * TOKEN_BYTES
    async with serve(FakeBackendConfig(n_slots=1), EngineConfig(prompt_cache_bytes=budget)) as served:
        prompts = [f"{name} conversation, with enough text to keep" for name in ("alpha", "bravo", "delta")]
        for n, prompt in enumerate(prompts, start=1):
            await complete(served, prompt)
            await wait_for(lambda n=n: n_stashes(served) == n)  # the idle engine saved the slot
        assert served.backend.stashed_bytes() == 2 * 45 * TOKEN_BYTES
        await complete(served, prompts[1] + " and more")  # bravo is in the cache, not in the slot: a hit
        await wait_for(lambda: n_stashes(served) == 4)  # its 54 tokens are saved in turn: delta goes
        metrics = await scrape(served)
        stashed_bytes = served.backend.stashed_bytes()
    assert metrics["qwen3_local_prompt_cache_budget_bytes"] == budget
    assert metrics["qwen3_local_prompt_cache_bytes"] == (45 + 54) * TOKEN_BYTES == stashed_bytes
    assert metrics["qwen3_local_prompt_cache_entries"] == 2
    assert metrics["qwen3_local_prompt_cache_evictions_total"] == 2
    assert metrics["qwen3_local_prompt_cache_hits_total"] == 1
    assert metrics["qwen3_local_prompt_cache_misses_total"] == 3
    assert metrics["qwen3_local_prompt_cache_stashes_skipped_total"] == 0
    assert metrics["qwen3_local_prompt_cache_stash_seconds_per_mib"] > 0
