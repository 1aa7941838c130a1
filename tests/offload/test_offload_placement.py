"""Plans turned into llama.cpp parameters, and the expected buffer list used to check a load."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from offload.gguf_shape import KvType, ModelShape
from offload.hardware import MIB
from offload.placement import LLAMA_LOAD_MODE_MMAP, LLAMA_LOAD_MODE_MMAP_MLOCK, placement_for
from offload.planner import PlanRequest, plan
from offload.verify import BufferCheck, ExpectedBuffers, check, expected_buffers


def test_placement_carries_the_plan(qwen3next_80b: ModelShape, machine) -> None:
    result = plan(qwen3next_80b, machine((16,)), PlanRequest(ctx=32768, parallel=4, kv_type=KvType.Q8_0, n_ubatch=512))
    placement = placement_for(result)
    assert placement.n_gpu_layers == 49
    assert placement.tensor_overrides == result.tensor_overrides
    assert placement.tensor_split == ()
    assert (placement.n_ctx_per_slot, placement.n_seq_max, placement.n_ctx) == (32768, 4, 4 * 32768)
    assert (placement.type_k, placement.type_v) == (KvType.Q8_0, KvType.Q8_0)
    kwargs = placement.backend_config_kwargs()
    assert kwargs["n_slots"] == 4 and kwargs["n_ctx_per_slot"] == 32768
    assert kwargs["type_k"] == "q8_0" and kwargs["flash_attn"] == "on"
    assert kwargs["tensor_overrides"] == result.tensor_overrides
    assert kwargs["use_extra_bufts"] is False
    model = placement.model_params()
    assert model["load_mode"] == LLAMA_LOAD_MODE_MMAP
    context = placement.context_params()
    assert (context["type_k"], context["type_v"], context["flash_attn_type"]) == (8, 8, 1)
    assert context["n_ctx"] == 4 * 32768 and context["n_seq_max"] == 4 and context["n_outputs_max"] == 0
    locked = placement_for(plan(qwen3next_80b, machine((16,)), PlanRequest(ctx=4096, use_mlock=True, n_ubatch=512)))
    assert locked.model_params()["load_mode"] == LLAMA_LOAD_MODE_MMAP_MLOCK


def test_two_gpu_placement_states_the_split(qwen3next_80b: ModelShape, machine) -> None:
    result = plan(qwen3next_80b, machine((16, 24)), PlanRequest(ctx=8192, kv_type=KvType.F16, n_ubatch=512))
    placement = placement_for(result)
    assert len(placement.tensor_split) == 2 and sum(placement.tensor_split) == 49
    assert placement.model_params()["tensor_split"] == result.tensor_split


def test_expected_buffers_name_what_llama_cpp_logs(qwen3next_80b: ModelShape, machine) -> None:
    result = plan(qwen3next_80b, machine((16,)), PlanRequest(ctx=32768, kv_type=KvType.F16, n_ubatch=512))
    expected = expected_buffers(result, qwen3next_80b)
    gpu = result.device("CUDA0")
    assert set(expected.model) == {"CPU_Mapped", "CUDA0"}
    assert expected.model["CUDA0"] == gpu.weights_bytes
    # mmap: the CPU buffer spans the file from token_embd to the last RAM-resident expert
    assert expected.model["CPU_Mapped"] >= result.device("CPU").weights_bytes
    assert expected.kv == {"CUDA0": gpu.kv_bytes}
    assert expected.recurrent == {"CUDA0": gpu.recurrent_bytes}
    assert expected.compute == {"CUDA0": gpu.compute_bytes, "CUDA_Host": result.device("CPU").compute_bytes}
    assert expected.output == {"CUDA_Host": 151936 * 4}


def test_check_pairs_predictions_with_a_report() -> None:
    expected = ExpectedBuffers(
        model={"CPU_Mapped": 100 * MIB}, kv={"CPU": 10 * MIB}, recurrent={}, compute={"CPU": 50 * MIB}, output={}
    )

    @dataclass(frozen=True)
    class Report:
        model_bytes: Mapping[str, int]
        kv_cache_bytes: Mapping[str, int]
        recurrent_state_bytes: Mapping[str, int]
        compute_bytes: Mapping[str, int]
        output_bytes: Mapping[str, int]

    report = Report(
        model_bytes={"CPU_Mapped": 100 * MIB},
        kv_cache_bytes={"CPU": int(10.5 * MIB)},
        recurrent_state_bytes={},
        compute_bytes={"CPU": 50 * MIB, "CUDA_Host": MIB},
        output_bytes={"CPU": int(0.19 * MIB)},
    )
    checks = {(c.kind, c.name): c for c in check(expected, report)}
    assert checks[("model", "CPU_Mapped")].within(0.0)
    assert not checks[("kv", "CPU")].within(0.02)
    assert checks[("kv", "CPU")].relative_error == (10 - 10.5) / 10.5
    assert checks[("compute", "CUDA_Host")] == BufferCheck("compute", "CUDA_Host", 0, MIB)
    assert ("output", "CPU") in checks
