"""offload/rpc.py: whole layers over this machine, RPC workers and local GPUs, checked by invariants on real
model shapes (header-only GGUFs of Qwen3-Next-80B-A3B and Llama-3-70B), and `python -m offload plan
--rpc-device`. No GPU here: local GPUs are simulated (GpuInfo by hand, as `--gpu 16GiB` makes them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bindings.llama_backend import LlamaBackendConfig
from bindings.memory_report import MemoryReport
from offload.compute import CPU_DEVICE, ComputeConfig, compute_buffer_sizes
from offload.gguf_shape import KvType, ModelShape, read_model_shape
from offload.hardware import GIB, GpuInfo, HardwareError, parse_gpu_spec
from offload.planner import GPU_RUNTIME_OVERHEAD, PlanRequest, context_sizes, cuda_tensor_bytes, gpu_margin, ram_margin
from offload.rpc import (
    ACTIVATION_BYTES,
    MASK_BYTES_PER_POSITION,
    OUTPUT_TENSORS,
    POSITION_BYTES,
    LocalGpu,
    RpcDevice,
    RpcPlan,
    RpcPlanError,
    layer_bytes,
    local_budget_of,
    local_gpu,
    parse_link,
    parse_rpc_device,
    plan_rpc,
)
from offload.shape_fixture import Q4_K, dense_model, qwen3next_80b_a3b_q4_k_m, write_header_only_gguf
from server.rpc.boot import apply_plan, memory_check


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


def llama_cpp_devices(n_layer: int, n_gpu_layers: int, tensor_split: tuple[float, ...]) -> list[int | None]:
    """Where llama.cpp puts each layer and, last, the output layer: an index into model->devices (workers,
    then local GPUs), or None for the CPU. src/llama-model.cpp load_tensors, in its float32 arithmetic."""
    i_gpu_start = max(n_layer + 1 - n_gpu_layers, 0)
    act_gpu_layers = min(n_gpu_layers, n_layer + 1)
    splits = np.cumsum(np.array(tensor_split or [0.0], dtype=np.float32), dtype=np.float32)
    splits = splits / splits[-1] if splits[-1] else splits
    devices: list[int | None] = []
    for il in range(n_layer + 1):
        if il < i_gpu_start or il - i_gpu_start >= act_gpu_layers:
            devices.append(None)
        else:  # std::upper_bound(splits, float(il - i_gpu_start) / act_gpu_layers)
            position = np.float32(il - i_gpu_start) / np.float32(act_gpu_layers)
            devices.append(int(np.searchsorted(splits, position, side="right")))
    return devices


def planned_devices(plan: RpcPlan) -> list[int | None]:
    """The same from the plan: each layer's device, then the output layer's slot (on a worker, its weights
    stay on this CPU by the tensor override)."""
    devices: list[int | None] = [None] * plan.local.n_layers
    for index, device in enumerate((*plan.workers, *plan.gpus)):
        devices += [index] * device.n_layers
    if plan.output_on_gpu:
        output = len(plan.workers) + [gpu.device for gpu in plan.gpus].index(plan.output_device)
        return [*devices, output]
    holders = [index for index, worker in enumerate(plan.workers) if worker.n_layers]
    return [*devices, holders[-1] if holders else None]


def gpu_layer_cost(shape: ModelShape, index: int, ctx: int, parallel: int) -> tuple[int, int]:
    """One layer on a CUDA GPU: its tensors as CUDA pads them, and its KV/recurrent state."""
    weights = sum(cuda_tensor_bytes(tensor) for tensor in shape.layer_tensors(index))
    return weights, layer_bytes(shape, shape.layers[index], ctx, parallel, KvType.F16)[1]


def check_invariants(
    plan: RpcPlan,
    shape: ModelShape,
    workers: list[RpcDevice],
    ctx: int,
    parallel: int,
    gpus: tuple[LocalGpu, ...] = (),
) -> None:
    """What every RPC plan must satisfy, whatever the numbers."""
    devices = [plan.local, *plan.workers, *plan.gpus]
    # whole layers, contiguous, in llama.cpp's order (this machine, the workers, the local GPUs), covering the
    # model exactly once
    assert [d.first_layer for d in devices] == [sum(d.n_layers for d in devices[:i]) for i in range(len(devices))]
    assert sum(d.n_layers for d in devices) == shape.n_layer
    # every device within its budget, and the bytes are those of its layers (on a GPU, as CUDA holds them)
    for device in devices:
        assert device.used_bytes <= device.budget_bytes, device
        on_gpu = device in plan.gpus
        expected = [
            gpu_layer_cost(shape, i, ctx, parallel)
            if on_gpu
            else layer_bytes(shape, shape.layers[i], ctx, parallel, KvType.F16)
            for i in device.layers
        ]
        assert device.weight_bytes == sum(w for w, _ in expected)
        assert device.state_bytes == sum(s for _, s in expected)
    for worker, placed in zip(workers, plan.workers, strict=True):
        assert placed.budget_bytes == worker.budget_bytes < worker.free_bytes
    assert [(g.device, g.budget_bytes) for g in plan.gpus] == [(g.name, g.budget_bytes) for g in gpus]
    # the output layer: on a local GPU (counted against its budget), or on this CPU
    for gpu, placed in zip(gpus, plan.gpus, strict=True):
        assert placed.output_bytes == (gpu.output_bytes if placed.device == plan.output_device else 0)
    # llama.cpp parameters: the offloaded layers + the output layer, one tensor_split share per worker and
    # per local GPU, and llama.cpp's own assignment puts every layer and the output where the plan says
    n_offloaded = sum(d.n_layers for d in (*plan.workers, *plan.gpus))
    assert plan.n_gpu_layers == (n_offloaded + 1 if n_offloaded or plan.output_on_gpu else 0)
    if plan.n_gpu_layers:
        assert len(plan.tensor_split) == len(workers) + len(gpus)
        assert sum(plan.tensor_split) == plan.n_gpu_layers
    assert llama_cpp_devices(shape.n_layer, plan.n_gpu_layers, plan.tensor_split) == planned_devices(plan)
    # the output's weights are pinned to this CPU exactly when its slot is on a worker
    output_on_worker = plan.n_gpu_layers > 0 and not plan.output_on_gpu
    assert plan.tensor_overrides == (((OUTPUT_TENSORS, "CPU"),) if output_on_worker else ())
    assert plan.op_offload == (not gpus or plan.output_on_gpu)
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


# ------------------------------------------------------------------ local GPUs with workers (simulated GPUs)

CTX = 8192
RAM = 120 * GIB


def ram_budget(shape: ModelShape) -> int:
    return local_budget_of(shape, RAM, ram_margin(RAM))


def simulated_gpu(shape: ModelShape, name: str, size: str, index: int = 0) -> tuple[GpuInfo, LocalGpu]:
    gpu = parse_gpu_spec(size, index)  # as `--gpu 16GiB` describes it: all of it free
    return gpu, local_gpu(name, gpu, shape, ctx=CTX)


def real_gpu_compute(shape: ModelShape, plan: RpcPlan, gpu_index: int) -> int:
    """The compute buffer offload/compute.py replays for the plan's actual placement (workers' layers counted
    as CPU ones), on local GPU `gpu_index`."""
    devices = [CPU_DEVICE] * shape.n_layer
    for index, gpu in enumerate(plan.gpus):
        for layer in gpu.layers:
            devices[layer] = index
    output = next((i for i, gpu in enumerate(plan.gpus) if gpu.device == plan.output_device), CPU_DEVICE)
    n_ctx_seq, _ = context_sizes(CTX, 1)
    config = ComputeConfig(
        n_ctx_seq=n_ctx_seq,
        n_seq=1,
        n_ubatch=512,
        n_batch=512,
        layer_devices=tuple(devices),
        output_device=output,
        n_gpus=len(plan.gpus),
    )
    return compute_buffer_sizes(shape, config).get(gpu_index, 0)


def assumed_compute(gpu: GpuInfo, local: LocalGpu, holds_output: bool) -> int:
    """The compute buffer a LocalGpu's budget left room for: free less margin, overhead and the budget."""
    assumed = gpu.free_bytes - gpu_margin(gpu.total_bytes, PlanRequest()) - GPU_RUNTIME_OVERHEAD - local.budget_bytes
    return assumed + (local.output_compute_bytes if holds_output else 0)


def assert_gpu_is_full(shape: ModelShape, plan: RpcPlan, gpu_index: int) -> None:
    """A GPU took as many of the layers before its own as fit: the next one back would not."""
    gpu = plan.gpus[gpu_index]
    if gpu.first_layer > 0:
        weights, state = gpu_layer_cost(shape, gpu.first_layer - 1, CTX, 1)
        assert gpu.used_bytes + weights + state > gpu.budget_bytes


def test_a_local_gpu_takes_the_last_layers_and_the_output(qwen3next_80b: ModelShape) -> None:
    gpu, local = simulated_gpu(qwen3next_80b, "CUDA0", "16GiB")
    workers = [parse_rpc_device("box:16GiB@10Gbit")]
    plan = plan_rpc(qwen3next_80b, workers, local_budget_bytes=ram_budget(qwen3next_80b), ctx=CTX, gpus=[local])
    check_invariants(plan, qwen3next_80b, workers, CTX, 1, (local,))
    [on_gpu] = plan.gpus
    assert on_gpu.n_layers > 0 and on_gpu.layers[-1] == qwen3next_80b.n_layer - 1  # the last layers
    assert plan.output_device == "CUDA0" and on_gpu.output_bytes >= local.output_weight_bytes > 0
    assert_gpu_is_full(qwen3next_80b, plan, 0)
    assert plan.workers[0].n_layers > 0 and plan.local.n_layers > 0  # the rest is split as without a GPU
    assert plan.tensor_overrides == ()  # the logits are produced on this machine's GPU
    assert len(plan.tensor_split) == 2 and plan.tensor_split[1] == on_gpu.n_layers + 1
    # the budget left room for at least the compute buffer llama.cpp's reservation needs for this placement
    assert real_gpu_compute(qwen3next_80b, plan, 0) <= assumed_compute(gpu, local, holds_output=True)
    assert local.budget_bytes < gpu.free_bytes - gpu_margin(gpu.total_bytes, PlanRequest()) - GPU_RUNTIME_OVERHEAD


@pytest.mark.parametrize("slack", [0, -1])
def test_the_output_layer_counts_against_its_gpu(qwen3next_80b: ModelShape, slack: int) -> None:
    """A budget of exactly the last 5 layers and the output holds them; one byte less, only the last 4."""
    last_five = sum(sum(gpu_layer_cost(qwen3next_80b, i, CTX, 1)) for i in range(43, 48))
    _, sized = simulated_gpu(qwen3next_80b, "CUDA0", "16GiB")
    output_weights, output_compute = sized.output_weight_bytes, 1000
    gpu = LocalGpu("CUDA0", last_five + output_weights + output_compute + slack, output_weights, output_compute)
    workers = [parse_rpc_device("box:16GiB@10Gbit")]
    plan = plan_rpc(qwen3next_80b, workers, local_budget_bytes=ram_budget(qwen3next_80b), ctx=CTX, gpus=[gpu])
    check_invariants(plan, qwen3next_80b, workers, CTX, 1, (gpu,))
    assert plan.gpus[0].n_layers == (5 if slack == 0 else 4)
    assert plan.gpus[0].output_bytes == output_weights + output_compute


def test_the_load_report_checks_local_gpus_against_their_buffers(qwen3next_80b: ModelShape) -> None:
    _, local = simulated_gpu(qwen3next_80b, "CUDA0", "16GiB")
    plan = plan_rpc(qwen3next_80b, [], local_budget_bytes=ram_budget(qwen3next_80b), ctx=CTX, gpus=[local])
    memory = MemoryReport(
        model_bytes={"CPU_Mapped": 5, "CUDA0": 7},
        kv_cache_bytes={"CPU": 1, "CUDA0": 11},
        recurrent_state_bytes={"CUDA0": 13},
        compute_bytes={"CUDA0": 17},
        output_bytes={},
    )
    [check] = memory_check(plan.to_json(), memory)
    on_gpu = plan.gpus[0]
    assert check == {
        "device": "CUDA0",
        "planned_weight_bytes": on_gpu.weight_bytes + on_gpu.output_bytes,
        "reported_weight_bytes": 7,
        "planned_state_bytes": on_gpu.state_bytes,
        "reported_state_bytes": 24,
    }


def test_two_local_gpus_split_the_tail_the_last_holds_the_output(qwen3next_80b: ModelShape) -> None:
    gpus = [simulated_gpu(qwen3next_80b, f"CUDA{i}", "16GiB", i) for i in range(2)]
    locals_ = tuple(local for _, local in gpus)
    workers = [parse_rpc_device("box:16GiB@10Gbit")]
    plan = plan_rpc(qwen3next_80b, workers, local_budget_bytes=ram_budget(qwen3next_80b), ctx=CTX, gpus=locals_)
    check_invariants(plan, qwen3next_80b, workers, CTX, 1, locals_)
    assert [g.n_layers > 0 for g in plan.gpus] == [True, True]
    assert plan.gpus[1].layers[-1] == qwen3next_80b.n_layer - 1 and plan.output_device == "CUDA1"
    assert plan.gpus[0].output_bytes == 0
    for index in range(2):
        assert_gpu_is_full(qwen3next_80b, plan, index)
        holds_output = index == 1
        real = real_gpu_compute(qwen3next_80b, plan, index)
        assert real <= assumed_compute(gpus[index][0], gpus[index][1], holds_output)
    assert len(plan.tensor_split) == 3 and plan.tensor_overrides == ()


def test_a_gpu_too_small_for_the_output_gets_nothing(qwen3next_80b: ModelShape) -> None:
    """The output layer then stays on the CPU (the override, as without a GPU), the GPU's share is 0, and
    llama.cpp must not reserve op-offload buffers on it (op_offload off)."""
    _, tiny = simulated_gpu(qwen3next_80b, "CUDA0", "1GiB")
    assert tiny.budget_bytes < tiny.output_bytes
    workers = [parse_rpc_device("box:16GiB@10Gbit")]
    budget = ram_budget(qwen3next_80b)
    plan = plan_rpc(qwen3next_80b, workers, local_budget_bytes=budget, ctx=CTX, gpus=[tiny])
    check_invariants(plan, qwen3next_80b, workers, CTX, 1, (tiny,))
    without = plan_rpc(qwen3next_80b, workers, local_budget_bytes=budget, ctx=CTX)
    assert (plan.local, plan.workers, plan.traffic) == (without.local, without.workers, without.traffic)
    assert plan.gpus[0].n_layers == 0 and plan.output_device == "CPU"
    assert plan.tensor_split == (*without.tensor_split, 0.0) and plan.n_gpu_layers == without.n_gpu_layers
    assert plan.tensor_overrides == ((OUTPUT_TENSORS, "CPU"),) and not plan.op_offload
    backend = apply_plan(LlamaBackendConfig(), plan)
    assert (backend.tensor_split, backend.op_offload) == (plan.tensor_split, False)


def test_a_last_gpu_without_room_leaves_the_output_to_the_one_before(qwen3next_80b: ModelShape) -> None:
    _, big = simulated_gpu(qwen3next_80b, "CUDA0", "16GiB")
    _, tiny = simulated_gpu(qwen3next_80b, "CUDA1", "1GiB", 1)
    workers = [parse_rpc_device("box:16GiB@10Gbit")]
    plan = plan_rpc(qwen3next_80b, workers, local_budget_bytes=ram_budget(qwen3next_80b), ctx=CTX, gpus=[big, tiny])
    check_invariants(plan, qwen3next_80b, workers, CTX, 1, (big, tiny))
    assert plan.output_device == "CUDA0" and plan.gpus[0].layers[-1] == qwen3next_80b.n_layer - 1
    assert plan.gpus[1].n_layers == 0 and plan.tensor_split[-1] == 0.0 and plan.op_offload


def test_a_gpu_that_holds_the_whole_model_leaves_the_workers_idle(qwen3next_80b: ModelShape) -> None:
    _, large = simulated_gpu(qwen3next_80b, "CUDA0", "80GiB")
    workers = [parse_rpc_device("box:16GiB@10Gbit")]
    plan = plan_rpc(qwen3next_80b, workers, local_budget_bytes=ram_budget(qwen3next_80b), ctx=CTX, gpus=[large])
    check_invariants(plan, qwen3next_80b, workers, CTX, 1, (large,))
    assert plan.gpus[0].n_layers == qwen3next_80b.n_layer and plan.traffic == ()
    assert plan.tensor_split == (0.0, qwen3next_80b.n_layer + 1.0)


def test_without_a_gpu_the_plan_is_the_one_before(qwen3next_80b: ModelShape) -> None:
    workers = [parse_rpc_device("boxA:16GiB@10Gbit"), parse_rpc_device("boxB:24GiB@1Gbit")]
    plan = plan_rpc(qwen3next_80b, workers, local_budget_bytes=20 * GIB, ctx=CTX, gpus=())
    assert plan == plan_rpc(qwen3next_80b, workers, local_budget_bytes=20 * GIB, ctx=CTX)
    assert (plan.gpus, plan.output_device, plan.op_offload) == ((), "CPU", True)
    assert len(plan.tensor_split) == len(workers) and plan.tensor_overrides == ((OUTPUT_TENSORS, "CPU"),)
    assert "output layer" not in plan.render()


def test_the_gpus_take_their_part_of_what_does_not_fit(qwen3next_80b: ModelShape) -> None:
    _, gpu = simulated_gpu(qwen3next_80b, "CUDA0", "8GiB")
    with pytest.raises(RpcPlanError, match=r"local GPU\(s\) take the last \d+, the other \d+ need .* GiB short"):
        plan_rpc(qwen3next_80b, [parse_rpc_device("a:8GiB")], local_budget_bytes=8 * GIB, ctx=4096, gpus=[gpu])


def test_offload_cli_plans_local_gpus_with_rpc_devices(qwen3next_80b_gguf: Path) -> None:
    args = [sys.executable, "-m", "offload", "plan", str(qwen3next_80b_gguf), "--ram", "120GiB", "--gpu", "16GiB"]
    command = [*args, "--rpc-device", "box:16GiB@10Gbit", "--json"]
    document = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    [gpu] = document["gpus"]
    assert gpu["device"] == "CUDA0" and gpu["n_layers"] > 0 and document["output_device"] == "CUDA0"
    assert gpu["first_layer"] + gpu["n_layers"] == document["n_layer"]
    assert 0 < gpu["weight_bytes"] + gpu["state_bytes"] + gpu["output_bytes"] <= gpu["budget_bytes"]
    assert document["tensor_split"][-1] == gpu["n_layers"] + 1 and document["tensor_overrides"] == []
    table = subprocess.run([*args, "--rpc-device", "box:16GiB"], capture_output=True, text=True, check=True).stdout
    assert "CUDA0" in table and "output layer: CUDA0" in table
