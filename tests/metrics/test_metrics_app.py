"""The metrics in-process (fake backend): vLLM's per-request timings and finished reasons, and the
hardware and plan collectors fed with known readings."""

from __future__ import annotations

import asyncio

import pynvml
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from server.engine.fake_backend import FakeBackendConfig
from server.metrics import GpuReading, Metrics, Nvml
from tests.api.helpers import MODEL, raw_post, serve, wait_for

pytestmark = pytest.mark.anyio

HI = [{"role": "user", "content": "hi"}]


def families(text: str) -> dict[str, Metric]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(family: Metric, name: str | None = None) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == (name or family.name)}


def one(family: Metric, name: str, **labels: str) -> float:
    return sum(
        s.value for s in family.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def test_queue_prefill_and_decode_time_split_each_request() -> None:
    # one slot, 20 ms a step: the second request waits for the first's whole answer
    async with serve(FakeBackendConfig(n_slots=1, step_delay_s=0.02)) as served:
        body = {"messages": HI, "max_tokens": 10, "ignore_eos": True}
        first = asyncio.create_task(served.client.post("/v1/chat/completions", json=body))
        await wait_for(lambda: served.engine.stats().n_slots_busy == 1)
        second = await served.client.post("/v1/chat/completions", json=body)
        assert (await first).status_code == second.status_code == 200
        found = families((await served.client.get("/metrics")).text)
    queue = found["qwen3_local:request_queue_time_seconds"]
    decode = found["qwen3_local:request_decode_time_seconds"]
    prefill = found["qwen3_local:request_prefill_time_seconds"]
    for family in (queue, decode, prefill):
        assert one(family, f"{family.name}_count", model_name=MODEL) == 2
    # the second request queued for about the first's 10 steps; each decoded 9 steps after its first token
    assert one(queue, f"{queue.name}_sum") >= 9 * 0.02
    assert one(decode, f"{decode.name}_sum") >= 2 * 9 * 0.02
    assert 0 < one(prefill, f"{prefill.name}_sum") < one(decode, f"{decode.name}_sum")
    success = found["qwen3_local:request_success"]
    assert samples(success, "qwen3_local:request_success_total") == {
        (("finished_reason", "length"), ("model_name", MODEL)): 2
    }


async def test_a_client_that_leaves_mid_stream_counts_as_abort() -> None:
    async with serve(FakeBackendConfig(step_delay_s=0.01)) as served:
        exchange = await raw_post(
            served.app, "/v1/chat/completions", {"messages": HI, "max_tokens": 200, "stream": True}
        )
        assert await exchange.status() == 200
        await exchange.next_body()
        await exchange.disconnect()
        await wait_for(lambda: served.engine.stats().n_slots_busy == 0)
        response = await served.client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 3})
        assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
        found = families((await served.client.get("/metrics")).text)
    success = samples(found["qwen3_local:request_success"], "qwen3_local:request_success_total")
    reason = response.json()["choices"][0]["finish_reason"]
    assert success == {
        (("finished_reason", "abort"), ("model_name", MODEL)): 1,
        (("finished_reason", reason), ("model_name", MODEL)): 1,
    }


def test_gpus_are_series_per_device_and_unreported_fields_are_left_out() -> None:
    gpus = [
        GpuReading(0, "NVIDIA H200", 100 << 30, 141 << 30, 0.75, 61.0, 420.5),
        GpuReading(1, "NVIDIA L4", 1 << 30, 24 << 30, None, 40.0, None),  # no utilisation / power reported
    ]
    found = families(Metrics(lambda: None, "m", read_gpus=lambda: gpus).render().decode())
    assert samples(found["qwen3_local_gpu_memory_used_bytes"]) == {
        (("gpu", "0"), ("name", "NVIDIA H200")): 100 << 30,
        (("gpu", "1"), ("name", "NVIDIA L4")): 1 << 30,
    }
    assert samples(found["qwen3_local_gpu_memory_total_bytes"])[(("gpu", "1"), ("name", "NVIDIA L4"))] == 24 << 30
    assert samples(found["qwen3_local_gpu_utilization_ratio"]) == {(("gpu", "0"), ("name", "NVIDIA H200")): 0.75}
    assert samples(found["qwen3_local_gpu_power_watts"]) == {(("gpu", "0"), ("name", "NVIDIA H200")): 420.5}
    assert len(samples(found["qwen3_local_gpu_temperature_celsius"])) == 2


def test_no_nvidia_driver_means_no_gpu_series_and_no_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_driver() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)
    assert Nvml().gpus() == []
    found = families(Metrics(lambda: None, "m").render().decode())
    for name in ("memory_used_bytes", "memory_total_bytes", "utilization_ratio", "temperature_celsius", "power_watts"):
        assert found[f"qwen3_local_gpu_{name}"].samples == []
    assert found["qwen3_local_model_ready"].samples[0].value == 0
    assert found["qwen3_local:num_requests_running"].samples == []  # declared while the model loads


def test_nvml_readings_come_from_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real pynvml call sequence, against a driver stand-in that reports one GPU without power readings."""

    class Memory:
        used, total = 3 << 30, 16 << 30

    class Utilization:
        gpu = 42

    def not_supported(*_: object) -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    calls = {
        "nvmlInit": lambda: None,
        "nvmlDeviceGetCount": lambda: 1,
        "nvmlDeviceGetHandleByIndex": lambda index: f"handle{index}",
        "nvmlDeviceGetMemoryInfo": lambda handle: Memory(),
        "nvmlDeviceGetName": lambda handle: b"Tesla T4",
        "nvmlDeviceGetUtilizationRates": lambda handle: Utilization(),
        "nvmlDeviceGetTemperature": lambda handle, sensor: 55,
        "nvmlDeviceGetPowerUsage": not_supported,
    }
    for name, call in calls.items():
        monkeypatch.setattr(pynvml, name, call)
    assert Nvml().gpus() == [GpuReading(0, "Tesla T4", 3 << 30, 16 << 30, 0.42, 55.0, None)]


def test_plan_placement_as_gauges() -> None:
    def device(name: str, kind: str, weights: int) -> dict[str, object]:
        uses = {"weights": weights, "kv": 10, "recurrent": 20, "compute": 30, "overhead": 40, "budget": 10**9}
        return {"name": name, "kind": kind, **{f"{k}_bytes": v for k, v in uses.items()}, "total_bytes": weights + 100}

    def layer(index: int, where: str, experts: str) -> dict[str, object]:
        return {"index": index, "kind": "attention", "device": where, "experts_device": experts}

    plan = {
        "devices": [device("CUDA0", "gpu", 7000), device("CPU", "cpu", 9000)],
        "layers": [layer(0, "CUDA0", "CPU"), layer(1, "CUDA0", "CPU"), layer(2, "CUDA0", "CUDA0")],
        "predicted": {"decode_tokens_per_s": 71.5, "decode_tokens_per_s_single": 51.6},
    }
    found = families(Metrics(lambda: None, "m", lambda: {"plan": plan}, read_gpus=list).render().decode())
    assert samples(found["qwen3_local_plan_layers"]) == {(("device", "CUDA0"),): 3, (("device", "CPU"),): 0}
    assert samples(found["qwen3_local_plan_expert_layers"]) == {(("device", "CUDA0"),): 1, (("device", "CPU"),): 2}
    placed = samples(found["qwen3_local_plan_device_bytes"])
    assert placed[(("device", "CUDA0"), ("use", "weights"))] == 7000
    assert placed[(("device", "CPU"), ("use", "total"))] == 9100
    assert len(placed) == 2 * 7
    predicted = found["qwen3_local_plan_predicted_decode_tokens_per_second"]
    assert samples(predicted) == {(("model_name", "m"),): 71.5}
    # loaded without --auto-offload: the report has no plan, the families stay declared and empty
    empty = families(Metrics(lambda: None, "m", lambda: {"model": "m"}, read_gpus=list).render().decode())
    assert empty["qwen3_local_plan_layers"].samples == [] and empty["qwen3_local_plan_device_bytes"].samples == []


def test_audit_spool_gauges_read_the_spool_at_scrape_time() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from server.metrics import Metrics

    spool = {"bytes": 0}
    on = Metrics(lambda: None, "m", read_audit_spool=lambda: (spool["bytes"], 64 << 20), read_gpus=lambda: [])
    spool["bytes"] = 4096
    samples = {s.name: s.value for f in text_string_to_metric_families(on.render().decode()) for s in f.samples}
    assert samples["qwen3_local_audit_spool_bytes"] == 4096
    assert samples["qwen3_local_audit_spool_capacity_bytes"] == 64 << 20
    off = Metrics(lambda: None, "m", read_gpus=lambda: [])
    text = off.render().decode()
    assert "# TYPE qwen3_local_audit_spool_bytes gauge" in text and "\nqwen3_local_audit_spool_bytes " not in text
