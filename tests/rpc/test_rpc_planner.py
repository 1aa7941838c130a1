"""offload/rpc.py: whole layers over this machine and RPC workers, checked by invariants on real model shapes
(header-only GGUFs of Qwen3-Next-80B-A3B and Llama-3-70B), and `python -m offload plan --rpc-device`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from offload.gguf_shape import KvType, ModelShape, read_model_shape
from offload.hardware import GIB, HardwareError
from offload.rpc import (
    ACTIVATION_BYTES,
    MASK_BYTES_PER_POSITION,
    OUTPUT_TENSORS,
    POSITION_BYTES,
    RpcDevice,
    RpcPlan,
    RpcPlanError,
    layer_bytes,
    parse_link,
    parse_rpc_device,
    plan_rpc,
)
from offload.shape_fixture import Q4_K, dense_model, qwen3next_80b_a3b_q4_k_m, write_header_only_gguf


@pytest.fixture(scope="module")
def qwen3next_80b_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_header_only_gguf(qwen3next_80b_a3b_q4_k_m(), tmp_path_factory.mktemp("shapes") / "q3n-80b.gguf")


@pytest.fixture(scope="module")
def qwen3next_80b(qwen3next_80b_gguf: Path) -> ModelShape:
    return read_model_shape(qwen3next_80b_gguf)


@pytest.fixture(scope="module")
def dense_70b(tmp_path_factory: pytest.TempPathFactory) -> ModelShape:
    model = dense_model(80, 8192, 28672, 64, 8, 128256, Q4_K)
    return read_model_shape(write_header_only_gguf(model, tmp_path_factory.mktemp("shapes") / "dense-70b.gguf"))


def check_invariants(plan: RpcPlan, shape: ModelShape, workers: list[RpcDevice], ctx: int, parallel: int) -> None:
    """What every RPC plan must satisfy, whatever the numbers."""
    devices = [plan.local, *plan.workers]
    # whole layers, contiguous, in llama.cpp's order (this machine first), covering the model exactly once
    assert [d.first_layer for d in devices] == [sum(d.n_layers for d in devices[:i]) for i in range(len(devices))]
    assert sum(d.n_layers for d in devices) == shape.n_layer
    # every device within its budget, and the bytes are those of its layers
    for device in devices:
        assert device.used_bytes <= device.budget_bytes, device
        expected = [layer_bytes(shape, shape.layers[i], ctx, parallel, KvType.F16) for i in device.layers]
        assert device.weight_bytes == sum(w for w, _ in expected)
        assert device.state_bytes == sum(s for _, s in expected)
    for worker, placed in zip(workers, plan.workers, strict=True):
        assert placed.budget_bytes == worker.budget_bytes < worker.free_bytes
    # llama.cpp parameters: workers' layers + the output layer; the output's weights pinned to this CPU
    n_worker_layers = sum(w.n_layers for w in plan.workers)
    assert plan.n_gpu_layers == (n_worker_layers + 1 if n_worker_layers else 0)
    if n_worker_layers:
        assert sum(plan.tensor_split) == plan.n_gpu_layers
        assert plan.tensor_overrides == ((OUTPUT_TENSORS, "CPU"),)
    # traffic per token: one hidden state each way per worker that holds layers, its positions, and the
    # attention mask where it holds attention layers
    holders = [(w, p) for w, p in zip(workers, plan.workers, strict=True) if p.n_layers]
    assert [t.device for t in plan.traffic] == [w.name for w, _ in holders]
    for (worker, placed), traffic in zip(holders, plan.traffic, strict=True):
        has_kv = any(shape.layers[i].has_kv for i in placed.layers)
        expected_bytes = 2 * shape.n_embd * ACTIVATION_BYTES + POSITION_BYTES + has_kv * MASK_BYTES_PER_POSITION * ctx
        assert traffic.bytes_per_token == expected_bytes
        assert traffic.seconds_per_token == pytest.approx(
            expected_bytes / worker.bandwidth_bytes_s + 2 * worker.latency_s
        )
    assert plan.traffic_bytes_per_token == sum(t.bytes_per_token for t in plan.traffic)


@pytest.mark.parametrize(
    ("local_gib", "worker_specs", "ctx", "parallel"),
    [
        (20, ["boxA:16GiB@10Gbit+0.2ms", "boxB:24GiB@1Gbit"], 8192, 2),  # 45 GiB over three machines
        (60, ["boxA:16GiB@10Gbit"], 32768, 1),  # fits here alone: the worker still takes its share
        (4, ["a:16GiB", "b:16GiB", "c:16GiB"], 4096, 4),  # mostly remote
        (0, ["a:30GiB@25Gbit", "b:30GiB@25Gbit"], 4096, 1),  # nothing here but the embeddings and output
    ],
)
def test_qwen3next_80b_plans_keep_every_invariant(
    qwen3next_80b: ModelShape, local_gib: int, worker_specs: list[str], ctx: int, parallel: int
) -> None:
    workers = [parse_rpc_device(spec) for spec in worker_specs]
    plan = plan_rpc(qwen3next_80b, workers, local_budget_bytes=local_gib * GIB, ctx=ctx, parallel=parallel)
    check_invariants(plan, qwen3next_80b, workers, ctx, parallel)
    assert all(worker.n_layers > 0 for worker in plan.workers)  # every worker takes layers
    # Qwen3-Next: a full-attention layer every 4th, so every worker with 4+ layers receives the attention mask
    assert all(t.bytes_per_token > ctx * MASK_BYTES_PER_POSITION for t in plan.traffic)


def test_shares_follow_the_budgets(dense_70b: ModelShape) -> None:
    """Uniform layers: each device's share of the layers is its share of the budget, to within one layer."""
    workers = [parse_rpc_device("a:12GiB"), parse_rpc_device("b:24GiB")]
    plan = plan_rpc(dense_70b, workers, local_budget_bytes=12 * GIB, ctx=4096, parallel=1)
    check_invariants(plan, dense_70b, workers, 4096, 1)
    budgets = [plan.local.budget_bytes, *(w.budget_bytes for w in plan.workers)]
    for device, budget in zip([plan.local, *plan.workers], budgets, strict=True):
        assert abs(device.n_layers - dense_70b.n_layer * budget / sum(budgets)) <= 1.5


def test_a_model_that_fits_nowhere_says_by_how_much(qwen3next_80b: ModelShape) -> None:
    with pytest.raises(RpcPlanError, match=r"GiB short"):
        plan_rpc(qwen3next_80b, [parse_rpc_device("a:8GiB")], local_budget_bytes=8 * GIB, ctx=4096)


def test_without_worker_layers_nothing_is_offloaded(dense_70b: ModelShape) -> None:
    plan = plan_rpc(dense_70b, [RpcDevice("tiny", free_bytes=GIB // 8)], local_budget_bytes=200 * GIB, ctx=4096)
    assert plan.workers[0].n_layers == 0
    assert (plan.n_gpu_layers, plan.tensor_split, plan.tensor_overrides, plan.traffic) == (0, (), (), ())


def test_device_specs_parse() -> None:
    device = parse_rpc_device("gpu-box.lan:16GiB@10Gbit+0.3ms")
    assert device == RpcDevice("gpu-box.lan", 16 * GIB, 10e9 / 8, 0.3e-3)
    assert parse_link("1.25GB/s") == pytest.approx(1.25e9)
    assert parse_link("100Mbps") == pytest.approx(100e6 / 8)
    assert parse_rpc_device("10.0.0.2:50052:8GiB").name == "10.0.0.2:50052"  # an endpoint as the name
    for bad in ("16GiB", "box:sixteen", "box:16GiB@fast", "box:16GiB+soon"):
        with pytest.raises(HardwareError):
            parse_rpc_device(bad)


def test_offload_cli_plans_for_rpc_devices(qwen3next_80b_gguf: Path) -> None:
    args = [sys.executable, "-m", "offload", "plan", str(qwen3next_80b_gguf), "--ram", "24GiB"]
    workers = ["--rpc-device", "boxA:16GiB@10Gbit", "--rpc-device", "boxB:16GiB@10Gbit"]
    result = subprocess.run([*args, *workers, "--ctx", "4096", "--json"], capture_output=True, text=True, check=True)
    document = json.loads(result.stdout)
    assert [w["device"] for w in document["workers"]] == ["boxA", "boxB"]
    assert all(0 < w["weight_bytes"] + w["state_bytes"] <= w["budget_bytes"] for w in document["workers"])
    assert document["traffic_bytes_per_token"] > 0
    table = subprocess.run([*args, *workers], capture_output=True, text=True, check=True).stdout
    assert "boxA" in table and "network per token" in table
    too_small = subprocess.run([*args, "--rpc-device", "a:1GiB"], capture_output=True, text=True)
    assert too_small.returncode == 1 and "short" in too_small.stderr and len(too_small.stderr.splitlines()) == 1
    bad = subprocess.run([*args, "--rpc-device", "a:lots"], capture_output=True, text=True)
    assert bad.returncode == 2 and "cannot read size" in bad.stderr
