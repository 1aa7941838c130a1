"""Benchmark: read the Qwen3-Next-80B-A3B Q4_K_M header (a 45 GiB file, sparse) and plan it for a 16 GiB GPU
and 120 GiB of RAM with every choice left to the planner (KV type, micro-batch, expert placement).

Run with `pytest bench/test_bench_planner.py`; no assertion on time (see the benchmark table)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from offload.gguf_shape import read_model_shape
from offload.hardware import GIB, CpuInfo, GpuInfo, HardwareProfile
from offload.planner import Plan, PlanRequest, plan
from offload.shape_fixture import qwen3next_80b_a3b_q4_k_m, write_header_only_gguf

MACHINE = HardwareProfile(
    gpus=(GpuInfo("16 GiB GPU", 16 * GIB, 16 * GIB, 448e9, 4, 16),),
    cpu=CpuInfo("16-core CPU", 16, 32, frozenset({"avx2"})),
    ram_total_bytes=120 * GIB,
    ram_available_bytes=120 * GIB,
    ram_bandwidth_bytes_per_s=80e9,
)


@pytest.fixture(scope="module")
def header_80b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "Qwen3-Next-80B-A3B-Instruct-Q4_K_M.gguf"
    return write_header_only_gguf(qwen3next_80b_a3b_q4_k_m(), path)


def read_and_plan(path: Path) -> Plan:
    return plan(read_model_shape(path), MACHINE, PlanRequest(ctx=32768))


def test_bench_read_header_and_plan_80b(benchmark: Any, header_80b: Path) -> None:
    result = benchmark.pedantic(read_and_plan, args=(header_80b,), rounds=3, iterations=1, warmup_rounds=0)
    assert result.n_gpu_layers == 49
    assert result.gpu_expert_layers > 0
