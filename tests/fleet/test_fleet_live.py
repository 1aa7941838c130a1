"""Several models in one live `python -m server` over real llama.cpp: SmolLM2 under two ids with different
settings plus a tiny qwen3next; concurrent streams to two models give exactly each model's solo greedy answers;
a model not preloaded loads on its first request; unloading after keep_alive frees its memory (RSS)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from registry.models import load_registry, resolve_model
from tests.integration.conftest import CacheHome, LiveServer, start_server, stop_server

MIB = 1 << 20
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,", "def fibonacci(n):"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def fleet_server(
    tmp_path_factory: pytest.TempPathFactory, fleet_cache_home: CacheHome, tiny_qwen3next_gguf: Path
) -> Iterator[LiveServer]:
    folder = tmp_path_factory.mktemp("fleet")
    config = folder / "fleet.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "serve": [
                    {"model": "smollm2-135m-instruct", "id": "small", "parallel": 4, "ctx_size": 512},
                    {"model": str(tiny_qwen3next_gguf), "id": "next", "parallel": 2, "ctx_size": 256, "preload": True},
                    {  # the same GGUF with other settings, loaded on demand, its weights read into RAM (no mmap)
                        "model": "smollm2-135m-instruct",
                        "id": "resident",
                        "aliases": ["smol-copy"],
                        "parallel": 1,
                        "ctx_size": 256,
                        "mmap": False,
                        "keep_alive": "10m",
                    },
                ]
            }
        )
    )
    server = start_server(["--config", str(config)], folder / "server.log", fleet_cache_home, timeout_s=180)
    deadline = time.monotonic() + 120
    while not all(card["state"] == "loaded" for card in _cards(server) if card["id"] in ("small", "next")):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)
    yield server
    stop_server(server)


def _cards(server: LiveServer) -> list[dict[str, object]]:
    return list(httpx.get(server.base_url + "/v1/models", timeout=10).json()["data"])


def _state(server: LiveServer, model_id: str) -> object:
    return next(card["state"] for card in _cards(server) if card["id"] == model_id)


async def _stream(client: httpx.AsyncClient, model: str, prompt: str) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    parts: list[str] = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                parts.extend(choice["text"] for choice in json.loads(line[6:])["choices"])
    return "".join(parts)


def test_concurrent_streams_to_two_models_give_each_model_s_solo_answers(fleet_server: LiveServer) -> None:
    async def run() -> None:
        async with httpx.AsyncClient(base_url=fleet_server.base_url, timeout=120) as client:
            solo = {(model, p): await _stream(client, model, p) for model in ("small", "next") for p in PROMPTS}
            jobs = [(model, p) for p in PROMPTS for model in ("small", "next")]
            together = await asyncio.gather(*(_stream(client, model, p) for model, p in jobs))
        assert dict(zip(jobs, together, strict=True)) == solo
        assert solo[("small", PROMPTS[0])] != solo[("next", PROMPTS[0])]  # two different models answered

    asyncio.run(run())


def test_a_model_not_loaded_loads_on_its_first_request_and_unloading_frees_its_memory(
    fleet_server: LiveServer,
) -> None:
    process = psutil.Process(fleet_server.process.pid)
    weights = resolve_model("smollm2-135m-instruct", load_registry()).path.stat().st_size
    assert _state(fleet_server, "resident") == "unloaded"
    before = process.memory_info().rss
    body = {"model": "smol-copy", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    response = httpx.post(fleet_server.base_url + "/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "resident" and response.json()["choices"][0]["text"]
    assert _state(fleet_server, "resident") == "loaded"
    loaded = process.memory_info().rss
    assert loaded - before > 0.8 * weights, f"RSS grew {(loaded - before) / MIB:.0f} MiB on load"

    # keep_alive 0 on a request: the model unloads as soon as it is done
    body["keep_alive"] = 0
    assert httpx.post(fleet_server.base_url + "/v1/completions", json=body, timeout=120).status_code == 200
    deadline = time.monotonic() + 30
    while _state(fleet_server, "resident") != "unloaded":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    freed = loaded - process.memory_info().rss
    print(
        f"weights {weights / MIB:.1f} MiB; RSS +{(loaded - before) / MIB:.1f} MiB on load, -{freed / MIB:.1f} on unload"
    )
    assert freed > 0.8 * weights, f"RSS fell only {freed / MIB:.0f} MiB of the {weights / MIB:.0f} MiB weights"
    health = httpx.get(fleet_server.base_url + "/health", timeout=10).json()
    assert health["models"]["resident"]["status"] == "unloaded" and health["status"] == "ok"


def test_with_auto_offload_several_preloads_load_with_their_shares_of_one_joint_plan(
    tmp_path: Path, fleet_cache_home: CacheHome, tiny_qwen3next_gguf: Path, tiny_qwen3moe_gguf: Path
) -> None:
    """--auto-offload with two models: each is loaded with its share of the joint plan (GET /plan says
    plan_scope "joint"), the two plans' RAM together within the machine's, and both answer."""
    config = tmp_path / "fleet.yaml"
    serve = [
        {"model": str(tiny_qwen3next_gguf), "id": "next", "parallel": 1, "ctx_size": 256, "preload": True},
        {"model": str(tiny_qwen3moe_gguf), "id": "moe", "parallel": 1, "ctx_size": 256, "preload": True},
    ]
    config.write_text(yaml.safe_dump({"serve": serve}))
    server = start_server(
        ["--config", str(config), "--auto-offload"], tmp_path / "server.log", fleet_cache_home, timeout_s=180
    )
    try:
        deadline = time.monotonic() + 120
        while not all(card["state"] == "loaded" for card in _cards(server)):
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.2)
        host_bytes = 0
        for model_id in ("next", "moe"):
            report = httpx.get(server.base_url + "/plan", params={"model": model_id}, timeout=10).json()
            assert report["plan_scope"] == "joint", report
            host_bytes += sum(d["total_bytes"] for d in report["plan"]["devices"] if d["kind"] == "cpu")
            body = {"model": model_id, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
            response = httpx.post(server.base_url + "/v1/completions", json=body, timeout=60)
            assert response.status_code == 200, response.text
        assert 0 < host_bytes < psutil.virtual_memory().total
    finally:
        stop_server(server)
