"""`python -m server --auto-offload` on this machine (no GPU: an all-CPU plan), on a hybrid qwen3next model."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.integration.conftest import CacheHome, start_server, stop_server


def test_auto_offload_plans_loads_checks_memory_and_serves(
    tiny_qwen3next_gguf: Path, tmp_path: Path, live_cache_home: CacheHome
) -> None:
    server = start_server(
        ["--model", str(tiny_qwen3next_gguf), "--auto-offload", "--parallel", "2", "--ctx-size", "512"],
        tmp_path / "server.log",
        live_cache_home,
    )
    try:
        report = httpx.get(server.base_url + "/plan").json()
        plan = report["plan"]
        assert plan["architecture"] == "qwen3next" and plan["parallel"] == 2 and plan["ctx"] == 512
        assert plan["n_gpu_layers"] == 0 and [d["kind"] for d in plan["devices"]] == ["cpu"]
        assert {layer["kind"] for layer in plan["layers"]} == {"attention", "ssm"}
        # no --prompt-cache-mib: the prompt cache gets the planner's share of the RAM the plan leaves
        assert report["prompt_cache"]["bytes"] == plan["prompt_cache_bytes"] > 0
        checked = {(c["kind"], c["buffer"]) for c in report["memory_check"]}
        assert {("model", "CPU_Mapped"), ("kv", "CPU"), ("recurrent", "CPU"), ("compute", "CPU")} <= checked
        assert all(c["within_tolerance"] for c in report["memory_check"]), report["memory_check"]
        answer = httpx.post(
            server.api_url + "/chat/completions",
            json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "ignore_eos": True},
            timeout=60,
        ).json()
        assert answer["usage"]["completion_tokens"] == 8
        log = server.log()
        assert "offload plan:" in log and "predicted: decode" in log and "memory recurrent CPU: predicted" in log
        # the hardware profile (RAM bandwidth measurement) is cached in the tests' --cache-dir, not ~/.cache
        assert (live_cache_home.qwen3_local / "hardware.json").is_file()
        assert not (live_cache_home.home / ".cache").exists()
    finally:
        stop_server(server)
