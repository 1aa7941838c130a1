"""`python -m server --auto-offload` (a tiny qwen3next model, this machine's all-CPU plan): the plan's
placement gauges on /metrics say what GET /plan says, and the measured decode rate appears beside the
predicted one once tokens are generated."""

from __future__ import annotations

from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import CacheHome, start_server, stop_server


def test_plan_gauges_match_get_plan(tiny_qwen3next_gguf: Path, tmp_path: Path) -> None:
    args = ["--model", str(tiny_qwen3next_gguf), "--auto-offload", "--parallel", "2", "--ctx-size", "512"]
    server = start_server(args, tmp_path / "server.log", CacheHome(tmp_path / "cache"))
    try:
        plan = httpx.get(server.base_url + "/plan", timeout=30).json()["plan"]
        answer = httpx.post(
            server.api_url + "/chat/completions",
            json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "ignore_eos": True},
            timeout=60,
        )
        assert answer.status_code == 200
        text = httpx.get(server.base_url + "/metrics", timeout=30).text
    finally:
        stop_server(server)
    found = {family.name: family for family in text_string_to_metric_families(text)}

    def by_labels(name: str) -> dict[tuple[str, ...], float]:
        return {tuple(s.labels.values()): s.value for s in found[name].samples}

    devices = [device["name"] for device in plan["devices"]]
    assert devices == ["CPU"]
    assert by_labels("qwen3_local_plan_layers") == {("CPU",): len(plan["layers"])}
    n_expert_layers = sum(1 for layer in plan["layers"] if layer["experts_device"] == "CPU")
    assert n_expert_layers > 0 and by_labels("qwen3_local_plan_expert_layers") == {("CPU",): n_expert_layers}
    placed = by_labels("qwen3_local_plan_device_bytes")
    for use in ("weights", "kv", "recurrent", "compute", "overhead", "total", "budget"):
        assert placed[("CPU", use)] == plan["devices"][0][f"{use}_bytes"], use
    predicted = by_labels("qwen3_local_plan_predicted_decode_tokens_per_second")
    [(model_name,)] = predicted
    assert predicted[(model_name,)] == plan["predicted"]["decode_tokens_per_s"] > 0
    [measured] = found["qwen3_local_decode_tokens_per_second"].samples
    assert measured.value > 0  # 8 tokens over the engine's step time
