"""The fleet's admission through offload/joint.py's one plan for all loaded models: two Qwen3-Next-80B Q4_K_M
shapes (header-only GGUFs) on a machine whose RAM holds one of them, not two."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from offload.hardware import GIB, CpuInfo, GpuInfo, HardwareProfile
from offload.planner import Plan
from offload.shape_fixture import qwen3next_80b_a3b_q4_k_m, write_header_only_gguf
from server.fleet.admission import JointAdmission, MemoryBudget, Resident
from server.fleet.fleet import Fleet
from server.fleet.spec import ModelSpec, model_specs
from server.settings import load_settings


def cpu_machine(ram_gib: float) -> HardwareProfile:
    return HardwareProfile(
        gpus=(),
        cpu=CpuInfo("test CPU", 16, 32, frozenset({"avx2", "fma"})),
        ram_total_bytes=int(ram_gib * GIB),
        ram_available_bytes=int(ram_gib * GIB),
        ram_bandwidth_bytes_per_s=80e9,
    )


@pytest.fixture(scope="module")
def two_80b(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelSpec, ModelSpec]:
    folder = tmp_path_factory.mktemp("shapes")
    paths = [write_header_only_gguf(qwen3next_80b_a3b_q4_k_m(), folder / f"{name}.gguf") for name in ("a", "b")]
    arguments = [argument for path in paths for argument in ("--model", str(path))]
    first, second = model_specs(load_settings([*arguments, "--ctx-size", "4096", "--parallel", "1"]))
    return first, second


def test_the_joint_plan_evicts_the_idle_model_and_waits_for_a_busy_one(two_80b: tuple[ModelSpec, ModelSpec]) -> None:
    first, second = two_80b
    admission = JointAdmission(cpu_machine(80), MemoryBudget(1 << 50))  # the byte budget would let both in
    assert admission.predicted_bytes(first) > 40 * GIB
    assert admission.decide(first, []).kind == "load"
    idle = admission.decide(second, [Resident(first.id, 0, idle=True, last_used=1.0)])
    assert idle.kind == "load" and idle.evict == (first.id,)
    busy = admission.decide(second, [Resident(first.id, 0, idle=False, last_used=1.0)])
    assert busy.kind == "wait" and "no idle model" in busy.reason
    assert admission.decide(second, []).kind == "load"
    never = JointAdmission(cpu_machine(16), MemoryBudget(1 << 50)).decide(first, [])
    assert never.kind == "never"


def test_a_model_the_planner_cannot_read_falls_back_to_the_byte_budget(tmp_path: Path) -> None:
    [spec] = model_specs(load_settings(["--model", str(tmp_path / "missing.gguf")]))
    admission = JointAdmission(cpu_machine(80), MemoryBudget(100, size_of=lambda _: 500))
    assert admission.decide(spec, []).kind == "never"  # the fallback's verdict: 500 bytes > a 100-byte budget


def gpu_machine(gpu_gib: float = 16, ram_gib: float = 200) -> HardwareProfile:
    """A 16 GiB PCIe-4 GPU beside a 16-core host with 80 GB/s RAM (tests/offload/test_joint_plan.py's machine)."""
    return HardwareProfile(
        gpus=(GpuInfo("test GPU 0", int(gpu_gib * GIB), int(gpu_gib * GIB), 448e9, 4, 16),),
        cpu=CpuInfo("test CPU", 16, 32, frozenset({"avx2", "fma"})),
        ram_total_bytes=int(ram_gib * GIB),
        ram_available_bytes=int(ram_gib * GIB),
        ram_bandwidth_bytes_per_s=80e9,
    )


def gpu_bytes(plan: Plan) -> int:
    return sum(device.total_bytes for device in plan.devices if device.kind == "gpu")


def test_a_model_loading_beside_a_placed_one_gets_its_share_of_the_gpu(two_80b: tuple[ModelSpec, ModelSpec]) -> None:
    """Loading re-plans: the second model is placed around the first one's placement (kept as loaded), and the
    plan the fleet hands the loader is that share, not the second model's plan alone on the whole GPU."""
    first, second = two_80b
    hardware = gpu_machine()
    admission = JointAdmission(hardware, MemoryBudget(1 << 50))
    alone = admission.decide(first, [])
    assert alone.kind == "load" and alone.plan is not None
    beside = admission.decide(second, [Resident(first.id, 0, idle=False, last_used=1.0)])
    assert beside.kind == "load" and beside.evict == () and beside.plan is not None
    gpu_budget = hardware.gpus[0].free_bytes
    assert gpu_bytes(alone.plan) > gpu_bytes(beside.plan)  # the first took the GPU first; the second gets less
    assert gpu_bytes(alone.plan) + gpu_bytes(beside.plan) <= gpu_budget
    again = admission.decide(first, [Resident(second.id, 0, idle=False, last_used=2.0)])
    assert again.plan is not None and gpu_bytes(again.plan) + gpu_bytes(beside.plan) <= gpu_budget


def test_preloads_are_planned_together_and_each_loads_with_its_share(two_80b: tuple[ModelSpec, ModelSpec]) -> None:
    """At start, several preloads are admitted in order: the second's plan is its share beside the first."""
    first, second = two_80b
    admission = JointAdmission(gpu_machine(), MemoryBudget(1 << 50))
    preloaded = [replace(first, preload=True), replace(second, preload=True)]
    fleet = Fleet(preloaded, builder=lambda spec, slot: pytest.fail("nothing loads here"), admission=admission)
    slots = list(fleet.slots.values())
    fleet._plan_preloads(slots)
    planned = [slot.planned for slot in slots]
    assert all(plan is not None for plan in planned)
    assert gpu_bytes(planned[0]) + gpu_bytes(planned[1]) <= gpu_machine().gpus[0].free_bytes  # type: ignore[arg-type]
