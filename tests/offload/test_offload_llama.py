"""Plans applied to real llama.cpp loads (CPU build): predicted buffers against what llama.cpp allocated."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from bindings.llama_backend import LlamaBackend, LlamaBackendConfig
from offload.gguf_shape import KvType, read_model_shape
from offload.hardware import HardwareProfile, detect, with_overrides
from offload.placement import placement_for
from offload.planner import PlanRequest, plan, tensor_override_pattern
from offload.verify import BufferCheck, check, expected_buffers
from registry.models import resolve_model

pytestmark = pytest.mark.slow

TOLERANCE = 0.02


@pytest.fixture(scope="module")
def this_machine(tmp_path_factory: pytest.TempPathFactory) -> HardwareProfile:
    profile = detect(cache_path=tmp_path_factory.mktemp("hardware") / "hardware.json")
    return with_overrides(profile, gpus=["none"])


def load_and_check(path: Path, hardware: HardwareProfile, request: PlanRequest) -> tuple[BufferCheck, ...]:
    shape = read_model_shape(path)
    result = plan(shape, hardware, request)
    backend = LlamaBackend(path, LlamaBackendConfig(**placement_for(result).backend_config_kwargs()))
    try:
        checks = check(expected_buffers(result, shape), backend.memory_report())
    finally:
        backend.close()
    return checks


def assert_all_within(checks: tuple[BufferCheck, ...], kinds: set[str]) -> None:
    assert {c.kind for c in checks if c.reported_bytes} >= kinds
    for buffer in checks:
        assert buffer.within(TOLERANCE), (
            f"{buffer.kind} {buffer.name}: predicted {buffer.predicted_bytes}, reported {buffer.reported_bytes} "
            f"({buffer.relative_error:+.2%})"
        )


@pytest.mark.parametrize(("ctx", "parallel", "kv_type"), [(2048, 1, None), (1000, 3, KvType.Q8_0)])
def test_smollm2_plan_matches_llama_cpp(
    this_machine: HardwareProfile, ctx: int, parallel: int, kv_type: KvType
) -> None:
    path = resolve_model("smollm2-135m-instruct").path
    checks = load_and_check(path, this_machine, PlanRequest(ctx=ctx, parallel=parallel, kv_type=kv_type))
    assert_all_within(checks, {"model", "kv", "compute", "output"})


def test_tiny_qwen3next_plan_matches_llama_cpp(this_machine: HardwareProfile, tiny_qwen3next_gguf: Path) -> None:
    checks = load_and_check(tiny_qwen3next_gguf, this_machine, PlanRequest(ctx=4096, parallel=4))
    # (its output buffer, a few kB of logits for a 425-token vocabulary, is logged as 0.00 MiB)
    assert_all_within(checks, {"model", "kv", "recurrent", "compute"})


def test_tiny_qwen3moe_plan_matches_llama_cpp(this_machine: HardwareProfile, tiny_qwen3moe_gguf: Path) -> None:
    checks = load_and_check(tiny_qwen3moe_gguf, this_machine, PlanRequest(ctx=2048, parallel=2, n_ubatch=256))
    assert_all_within(checks, {"model", "kv", "compute"})


@pytest.fixture
def moe_backend(tiny_qwen3moe_gguf: Path, this_machine: HardwareProfile) -> Iterator[LlamaBackend]:
    shape = read_model_shape(tiny_qwen3moe_gguf)
    result = plan(shape, this_machine, PlanRequest(ctx=1024))
    overrides = ((tensor_override_pattern([0, 1]), "CPU"),)
    config = LlamaBackendConfig(**{**placement_for(result).backend_config_kwargs(), "tensor_overrides": overrides})
    backend = LlamaBackend(tiny_qwen3moe_gguf, replace(config))
    yield backend
    backend.close()


def test_llama_cpp_accepts_the_expert_override_regex(moe_backend: LlamaBackend, tiny_qwen3moe_gguf: Path) -> None:
    # std::regex (ECMAScript) must parse the pattern; on a CPU build the experts stay where they were
    report = moe_backend.memory_report()
    shape = read_model_shape(tiny_qwen3moe_gguf)
    first = min(t.offset for t in shape.tensors)
    last = max(t.offset + t.n_bytes for t in shape.tensors)
    assert abs(report.model_bytes["CPU_Mapped"] - (last - first)) <= 0.006 * 1024 * 1024
