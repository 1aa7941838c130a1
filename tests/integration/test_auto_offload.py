"""`python -m server --auto-offload` on this machine (no GPU: an all-CPU plan), on a hybrid qwen3next model."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.integration.conftest import start_server, stop_server


def test_auto_offload_plans_loads_checks_memory_and_serves(tiny_qwen3next_gguf: Path, tmp_path: Path) -> None:
    server = start_server(
        ["--model", str(tiny_qwen3next_gguf), "--auto-offload", "--parallel", "2", "--ctx-size", "512"],
        tmp_path / "server.log",
    )
    try:
        report = httpx.get(server.base_url + "/plan").json()
        plan = report["plan"]
        assert plan["architecture"] == "qwen3next" and plan["parallel"] == 2 and plan["ctx"] == 512
        assert plan["n_gpu_layers"] == 0 and [d["kind"] for d in plan["devices"]] == ["cpu"]
        assert {layer["kind"] for layer in plan["layers"]} == {"attention", "ssm"}
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
    finally:
        stop_server(server)
