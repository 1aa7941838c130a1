"""The main process's side of `--rpc`: check the workers before binding the port, register them as ggml
devices before the model loads, and (with --auto-offload) plan whole layers over this machine (RAM and GPUs)
and them."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil

from bindings.devices import list_devices
from bindings.llama_backend import LlamaBackendConfig, supports_gpu_offload
from bindings.memory_report import MemoryReport
from bindings.rpc import GgmlRpc, RpcError, exit_cleanly_when_a_worker_dies, parse_endpoint, probe, rpc_supported
from offload.gguf_shape import GgufError, KvType, ModelShape, read_model_shape
from offload.hardware import GPU_DEVICE_KINDS, HardwareError, detect, is_rpc_device
from offload.planner import ram_margin
from offload.rpc import LocalGpu, RpcDevice, RpcPlan, RpcPlanError, local_budget_of, local_gpu, parse_link, plan_rpc
from server.settings import Settings

log = logging.getLogger(__name__)

LATENCY_SAMPLES = 5  # small requests timed per worker at start (each a full round trip)


@dataclass(frozen=True)
class RegisteredWorker:
    """A worker's device, registered with ggml here, as the planner and the load report see it."""

    endpoint: str
    device: str  # ggml's name here: RPC0, RPC1, ...
    free_bytes: int
    total_bytes: int
    latency_s: float  # one way, measured: half the median round trip of a memory query


def worker_error(settings: Settings) -> str | None:
    """One line saying why the --rpc workers cannot be used, or None; for the CLI, before binding the port
    (ggml-rpc itself would abort the process on a worker that does not answer)."""
    if not settings.rpc:
        return None
    if not rpc_supported():
        return (
            "--rpc needs llama-cpp-python built with its RPC backend (CMAKE_ARGS=-DGGML_RPC=ON): see the README's "
            "install command"
        )
    for endpoint in settings.rpc_endpoints():
        try:
            probe(parse_endpoint(endpoint))
        except (RpcError, ValueError) as exc:
            return str(exc)
    return None


def register_workers(settings: Settings) -> tuple[RegisteredWorker, ...]:
    """Register every --rpc worker's devices with ggml, so that llama.cpp can place layers on them; RpcError
    (one line) for a worker that cannot be used."""
    if not settings.rpc:
        return ()
    rpc = GgmlRpc()
    exit_cleanly_when_a_worker_dies()  # else ggml-rpc aborts; a server's WorkerLossHook stays (bindings/rpc.py)
    workers = []
    for text in settings.rpc_endpoints():
        endpoint = parse_endpoint(text)
        for index, device in enumerate(rpc.add_server(endpoint)):
            latency = _measure_latency(rpc, text, index)
            log.info(
                "RPC worker %s: device %s, %.2f of %.2f GiB free, %.3f ms one way",
                text,
                device.name,
                device.free_bytes / 2**30,
                device.total_bytes / 2**30,
                latency * 1e3,
            )
            workers.append(RegisteredWorker(text, device.name, device.free_bytes, device.total_bytes, latency))
    return tuple(workers)


def _measure_latency(rpc: GgmlRpc, endpoint: str, device: int) -> float:
    """Half the median round trip of a tiny request (a memory query) on ggml's own connection."""
    samples = []
    for _ in range(LATENCY_SAMPLES):
        started = time.perf_counter()
        rpc.device_memory(parse_endpoint(endpoint), device)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) / 2


def plan_devices(settings: Settings, workers: tuple[RegisteredWorker, ...]) -> tuple[RpcDevice, ...]:
    try:
        link = parse_link(settings.rpc_link)
    except HardwareError as exc:
        raise RpcError(f"--rpc-link: {exc}") from exc
    return tuple(
        RpcDevice(
            name=f"{w.device} ({w.endpoint})", free_bytes=w.free_bytes, bandwidth_bytes_s=link, latency_s=w.latency_s
        )
        for w in workers
    )


def local_layer_budget(shape: ModelShape) -> int:
    """RAM this machine's layers may take, from what is available now (offload.rpc.local_budget_of)."""
    memory = psutil.virtual_memory()
    return local_budget_of(shape, int(memory.available), ram_margin(int(memory.total)))


def local_gpus(settings: Settings, shape: ModelShape, backend: LlamaBackendConfig) -> tuple[LocalGpu, ...]:
    """This machine's GPUs as llama.cpp's registry lists them, in its order, each with its budget for layers
    (offload.rpc.local_gpu). The workers' RPC devices, which the registry lists as GPUs too, are not counted
    (offload.hardware.is_rpc_device); a CPU-only build has none, and then nothing else is probed."""
    if not supports_gpu_offload():
        return ()
    devices = list_devices()
    local = [d for d in devices if d.kind in GPU_DEVICE_KINDS and not is_rpc_device(d)]
    if not local:
        return ()
    hardware = detect(cache_path=settings.cache_dir / "hardware.json", backend_devices=devices)
    pairs = list(zip(local, hardware.gpus, strict=True))  # reconcile_gpus: one per such device, in order
    if any(device.kind == "gpu" for device, _ in pairs):  # llama_prepare_model_devices: iGPUs only without GPUs
        pairs = [(device, gpu) for device, gpu in pairs if device.kind == "gpu"]
    kv_type = KvType(backend.type_k) if backend.type_k in {k.value for k in KvType} else KvType.F16
    return tuple(
        local_gpu(
            device.name,
            gpu,
            shape,
            ctx=backend.n_ctx_per_slot,
            parallel=backend.n_slots,
            kv_type=kv_type,
            n_ubatch=backend.n_ubatch,
            n_batch=backend.n_batch,
            flash_attn=backend.flash_attn != "off",
        )
        for device, gpu in pairs
    )


def planned_backend(
    settings: Settings,
    model_path: Path,
    backend: LlamaBackendConfig,
    workers: tuple[RegisteredWorker, ...],
    report: dict[str, Any],
) -> LlamaBackendConfig:
    """--auto-offload with --rpc: whole layers over this machine's RAM, the workers and this machine's GPUs
    (offload/rpc.py); the rest of the parameters as the settings say. RpcError when the model does not fit
    them all."""
    try:
        shape = read_model_shape(model_path)
        kv_type = KvType(backend.type_k) if backend.type_k in {k.value for k in KvType} else KvType.F16
        rpc_plan = plan_rpc(
            shape,
            plan_devices(settings, workers),
            local_budget_bytes=local_layer_budget(shape),
            ctx=backend.n_ctx_per_slot,
            parallel=backend.n_slots,
            kv_type=kv_type,
            gpus=local_gpus(settings, shape, backend),
        )
    except (GgufError, RpcPlanError) as exc:
        raise RpcError(f"cannot plan over the RPC workers: {exc}") from exc
    log.info("RPC plan:\n%s", rpc_plan.render())
    report["rpc_plan"] = rpc_plan.to_json()
    return apply_plan(backend, rpc_plan)


def apply_plan(backend: LlamaBackendConfig, rpc_plan: RpcPlan) -> LlamaBackendConfig:
    """The llama.cpp parameters that realise the plan: tensor_split has one share per worker, then one per
    local GPU (llama.cpp's model->devices order); op offload stays as set unless the plan rules it out."""
    return replace(
        backend,
        n_gpu_layers=rpc_plan.n_gpu_layers,
        tensor_split=rpc_plan.tensor_split,
        tensor_overrides=rpc_plan.tensor_overrides + backend.tensor_overrides,
        op_offload=backend.op_offload and rpc_plan.op_offload,
    )


def report_workers(workers: tuple[RegisteredWorker, ...]) -> list[dict[str, Any]]:
    return [
        {
            "endpoint": w.endpoint,
            "device": w.device,
            "free_bytes": w.free_bytes,
            "total_bytes": w.total_bytes,
            "latency_s": w.latency_s,
        }
        for w in workers
    ]


def memory_check(rpc_plan: dict[str, Any], memory: MemoryReport) -> list[dict[str, Any]]:
    """Each worker's planned weights and KV/recurrent state against what llama.cpp says it allocated there
    (its buffers are named `RPC<n>[endpoint]`), then each local GPU's (buffers named as the device, CUDA0...),
    for the load report (GET /plan: `rpc_memory_check`)."""
    checks = []
    for worker in rpc_plan["workers"]:
        endpoint = worker["device"].rpartition("(")[2].rstrip(")")

        def on_worker(buffers: Mapping[str, int], endpoint: str = endpoint) -> int:
            return sum(n_bytes for name, n_bytes in buffers.items() if name.endswith(f"[{endpoint}]"))

        reported_state = on_worker(memory.kv_cache_bytes) + on_worker(memory.recurrent_state_bytes)
        checks.append(
            {
                "device": worker["device"],
                "planned_weight_bytes": worker["weight_bytes"],
                "reported_weight_bytes": on_worker(memory.model_bytes),
                "planned_state_bytes": worker["state_bytes"],
                "reported_state_bytes": reported_state,
            }
        )
    return checks + [_local_gpu_check(gpu, memory) for gpu in rpc_plan.get("gpus", [])]


def _local_gpu_check(gpu: dict[str, Any], memory: MemoryReport) -> dict[str, Any]:
    """A local GPU's plan against its buffers. Its planned weights include, on the GPU with the output layer,
    the output's whole share of the budget (weights and compute buffer growth): an upper bound there."""
    name = gpu["device"]
    return {
        "device": name,
        "planned_weight_bytes": gpu["weight_bytes"] + gpu["output_bytes"],
        "reported_weight_bytes": memory.model_bytes.get(name, 0),
        "planned_state_bytes": gpu["state_bytes"],
        "reported_state_bytes": memory.kv_cache_bytes.get(name, 0) + memory.recurrent_state_bytes.get(name, 0),
    }
