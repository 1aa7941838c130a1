"""Golden plans on the Qwen3-Next-80B-A3B Q4_K_M shape and on dense models, against hand-described machines.

The 80B numbers (16 GiB GPU + 120 GiB RAM, 32k context, micro-batch 512): the GPU holds the non-expert
weights of all 48 layers and the output layer (1.36 GiB), the KV cache of the 12 attention layers, the
recurrent state of the 36 Gated DeltaNet layers, its compute buffer (~540 MiB: one RAM-resident expert
tensor copied in for prompt batches, up to 420 MiB, or the 297 MiB of logits) and the CUDA runtime; the
routed experts of 13 layers fill the rest with one slot, 11 with four slots (3 GiB of f16 KV cache), 13 again
with four slots and a q8_0 KV cache.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from offload.gguf_shape import KvType, ModelShape, TensorKind
from offload.hardware import GIB, MIB
from offload.placement import placement_for
from offload.planner import (
    GPU_MIN_MARGIN,
    GPU_RUNTIME_OVERHEAD,
    DoesNotFitError,
    Plan,
    PlanError,
    PlanRequest,
    plan,
    replan_with_margin,
)

CTX = 32768


def pinned(parallel: int, kv_type: KvType = KvType.F16) -> PlanRequest:
    return PlanRequest(ctx=CTX, parallel=parallel, kv_type=kv_type, n_ubatch=512)


def gpu(result: Plan, name: str = "CUDA0"):
    return result.device(name)


def ram_expert_layers(result: Plan) -> list[int]:
    return [layer.index for layer in result.layers if layer.experts_device == "CPU"]


def assert_within_budgets(result: Plan) -> None:
    for device in result.devices:
        assert device.total_bytes <= device.budget_bytes, device


def assert_no_more_expert_layer_fits(result: Plan, shape: ModelShape) -> None:
    in_ram = ram_expert_layers(result)
    smallest = min(shape.layers[i].expert_bytes for i in in_ram)
    for device in result.devices:
        if device.kind == "gpu":
            assert device.free_bytes < smallest


def test_16gib_gpu_one_slot_fills_the_gpu_with_13_expert_layers(qwen3next_80b: ModelShape, machine) -> None:
    result = plan(qwen3next_80b, machine((16,)), pinned(1))
    # every layer's attention / SSM, norms, router and shared expert, and the output layer, on the GPU
    assert result.n_gpu_layers == 49
    assert {layer.device for layer in result.layers} == {"CUDA0"}
    assert result.output_device == "CUDA0"
    assert result.gpu_expert_layers == 13
    assert_within_budgets(result)
    assert_no_more_expert_layer_fits(result, qwen3next_80b)
    device = gpu(result)
    assert device.budget_bytes == 16 * GIB - max(GPU_MIN_MARGIN, int(16 * GIB * 0.02))
    assert device.overhead_bytes == GPU_RUNTIME_OVERHEAD
    assert device.kv_bytes == CTX * 24_576
    assert device.recurrent_bytes == 36 * (3 * 8192 + 128 * 4096) * 4
    non_expert_on_gpu = qwen3next_80b.non_expert_bytes - qwen3next_80b.embedding_bytes
    expert_on_gpu = sum(layer.expert_bytes for layer in result.layers if layer.experts_device == "CUDA0")
    assert device.weights_bytes == pytest.approx(non_expert_on_gpu + expert_on_gpu, rel=1e-3)
    assert 300 * MIB < device.compute_bytes < 800 * MIB
    cpu = result.device("CPU")
    assert cpu.weights_bytes == qwen3next_80b.embedding_bytes + sum(
        qwen3next_80b.layers[i].expert_bytes for i in ram_expert_layers(result)
    )


def test_the_override_moves_exactly_the_ram_experts(qwen3next_80b: ModelShape, machine) -> None:
    result = plan(qwen3next_80b, machine((16,)), pinned(1))
    assert len(result.tensor_overrides) == 1
    pattern, device = result.tensor_overrides[0]
    assert device == "CPU"
    matched = {t.name for t in qwen3next_80b.tensors if re.search(pattern, t.name)}
    expected = {
        t.name
        for t in qwen3next_80b.tensors
        if t.kind == TensorKind.ROUTED_EXPERTS and t.layer in set(ram_expert_layers(result))
    }
    assert matched == expected
    assert len(matched) == 3 * 35


def test_four_slots_cost_two_expert_layers_unless_the_kv_cache_is_q8_0(qwen3next_80b: ModelShape, machine) -> None:
    f16 = plan(qwen3next_80b, machine((16,)), pinned(4))
    assert gpu(f16).kv_bytes == 4 * CTX * 24_576  # 3 GiB
    assert gpu(f16).recurrent_bytes == 4 * 36 * (3 * 8192 + 128 * 4096) * 4
    assert f16.gpu_expert_layers == 11
    q8 = plan(qwen3next_80b, machine((16,)), pinned(4, KvType.Q8_0))
    assert gpu(q8).kv_bytes == 4 * CTX * 13_056
    assert q8.gpu_expert_layers == 13
    for result in (f16, q8):
        assert result.n_gpu_layers == 49
        assert_within_budgets(result)
        assert_no_more_expert_layer_fits(result, qwen3next_80b)
    assert q8.predicted.decode_tokens_per_s > f16.predicted.decode_tokens_per_s
    assert q8.flash_attn == "on"  # llama.cpp refuses a quantized V cache without flash attention


def test_the_planner_trades_kv_precision_for_expert_layers_and_says_so(qwen3next_80b: ModelShape, machine) -> None:
    result = plan(qwen3next_80b, machine((16,)), PlanRequest(ctx=CTX, parallel=4, n_ubatch=512))
    assert result.kv_type == KvType.Q8_0
    assert result.gpu_expert_layers == 13
    assert any("q8_0 instead of f16" in t and "2 more expert layers" in t for t in result.tradeoffs)
    one_slot = plan(qwen3next_80b, machine((16,)), PlanRequest(ctx=CTX, parallel=1, n_ubatch=512))
    assert one_slot.kv_type == KvType.F16  # the same 13 layers fit either way: no reason to lose precision
    assert any(t.startswith("kept the more precise f16 KV cache") for t in one_slot.tradeoffs)


def test_the_micro_batch_is_chosen_by_score(qwen3next_80b: ModelShape, machine) -> None:
    result = plan(qwen3next_80b, machine((16,)), PlanRequest(ctx=CTX, parallel=1, kv_type=KvType.F16))
    small = plan(qwen3next_80b, machine((16,)), pinned(1))
    assert result.n_ubatch in (512, 1024, 2048)
    assert result.score >= small.score * 0.98
    if result.n_ubatch != 512:
        assert result.predicted.prefill_tokens_per_s > small.predicted.prefill_tokens_per_s
        assert any(t.startswith(f"micro-batch {result.n_ubatch}") for t in result.tradeoffs)
    assert_within_budgets(result)


def test_no_gpu_keeps_everything_in_ram(qwen3next_80b: ModelShape, machine) -> None:
    result = plan(qwen3next_80b, machine(()), pinned(1))
    assert result.n_gpu_layers == 0
    assert result.tensor_overrides == ()
    assert [d.name for d in result.devices] == ["CPU"]
    assert {layer.device for layer in result.layers} == {"CPU"}
    assert {layer.experts_device for layer in result.layers} == {"CPU"}
    assert result.device("CPU").weights_bytes == qwen3next_80b.total_bytes
    assert_within_budgets(result)
    assert result.binding_constraint.startswith("no GPU")
    with_gpu = plan(qwen3next_80b, machine((16,)), pinned(1))
    assert with_gpu.predicted.decode_tokens_per_s > result.predicted.decode_tokens_per_s


def test_a_24_gb_gpu_holds_more_expert_layers(qwen3next_80b: ModelShape, machine) -> None:
    result = plan(qwen3next_80b, machine((24e9 / GIB,)), pinned(1))
    assert result.n_gpu_layers == 49
    assert result.gpu_expert_layers == 21
    assert_within_budgets(result)
    assert_no_more_expert_layer_fits(result, qwen3next_80b)


def test_two_gpus_split_the_layers_in_contiguous_runs(qwen3next_80b: ModelShape, machine) -> None:
    result = plan(qwen3next_80b, machine((16, 24e9 / GIB)), pinned(1))
    assert result.n_gpu_layers == 49
    assert sum(result.tensor_split) == 49
    devices = [layer.device for layer in result.layers]
    first_on_second = devices.index("CUDA1")
    assert set(devices[:first_on_second]) == {"CUDA0"} and set(devices[first_on_second:]) == {"CUDA1"}
    assert result.tensor_split[0] == first_on_second
    assert result.output_device == "CUDA1"
    for layer in result.layers:
        assert layer.experts_device in ("CPU", layer.device)
    experts_per_gpu = {
        name: sum(layer.experts_device == name for layer in result.layers) for name in ("CUDA0", "CUDA1")
    }
    assert experts_per_gpu["CUDA0"] > 0 and experts_per_gpu["CUDA1"] > experts_per_gpu["CUDA0"]
    assert_within_budgets(result)
    single = plan(qwen3next_80b, machine((16,)), pinned(1))
    assert result.gpu_expert_layers > single.gpu_expert_layers
    assert result.predicted.decode_tokens_per_s > single.predicted.decode_tokens_per_s


def test_a_dense_model_that_fits_goes_entirely_to_the_gpu(dense_8b: ModelShape, machine) -> None:
    result = plan(dense_8b, machine((24e9 / GIB,)), PlanRequest(ctx=8192))
    assert result.n_gpu_layers == dense_8b.n_layer + 1
    assert result.tensor_overrides == ()
    assert result.device("CPU").weights_bytes == dense_8b.embedding_bytes  # llama.cpp keeps token_embd on the CPU
    assert result.binding_constraint.startswith("none: the whole model is on the GPU")
    assert result.kv_type == KvType.F16
    assert_within_budgets(result)


def test_a_dense_model_too_big_for_the_gpu_keeps_its_first_layers_in_ram(dense_70b: ModelShape, machine) -> None:
    result = plan(dense_70b, machine((24e9 / GIB,), ram_gib=64), PlanRequest(ctx=8192, kv_type=KvType.F16))
    n_on_gpu = result.n_gpu_layers - 1  # the output layer counts as one
    assert 30 < n_on_gpu < dense_70b.n_layer
    devices = [layer.device for layer in result.layers]
    # llama.cpp offloads the last n_gpu_layers layers
    assert devices == ["CPU"] * (dense_70b.n_layer - n_on_gpu) + ["CUDA0"] * n_on_gpu
    assert_within_budgets(result)
    # one more layer would need its weights and its share of the KV cache
    one_more = dense_70b.layers[-1].total_bytes + result.n_ctx * dense_70b.kv_bytes_per_token(KvType.F16) // 80
    assert gpu(result).free_bytes < one_more
    assert "layers fit on the GPU" in result.binding_constraint


def test_a_model_that_fits_nowhere_names_the_shortfall(qwen3next_80b: ModelShape, machine) -> None:
    with pytest.raises(DoesNotFitError) as caught:
        plan(qwen3next_80b, machine((8,), ram_gib=16), PlanRequest(ctx=CTX))
    message = str(caught.value)
    assert "does not fit" in message
    shortfall = re.search(r"([\d.]+) GiB short", message)
    assert shortfall is not None and 20 < float(shortfall.group(1)) < 30
    assert "\n" not in message


def test_ram_is_never_planned_beyond_what_is_available(qwen3next_80b: ModelShape, machine) -> None:
    with pytest.raises(DoesNotFitError, match="short"):
        plan(qwen3next_80b, machine((16,), ram_gib=32), pinned(1))
    result = plan(qwen3next_80b, machine((16,), ram_gib=40), pinned(1))
    cpu = result.device("CPU")
    assert cpu.total_bytes <= cpu.budget_bytes < 40 * GIB


def test_an_unrequested_context_is_cut_to_fit(qwen3next_80b: ModelShape, machine) -> None:
    hardware = machine((16,), ram_gib=48)
    with pytest.raises(DoesNotFitError):
        plan(qwen3next_80b, hardware, PlanRequest(ctx=CTX, parallel=24, kv_type=KvType.F16, n_ubatch=512))
    result = plan(qwen3next_80b, hardware, PlanRequest(parallel=24, kv_type=KvType.F16, n_ubatch=512))
    assert result.ctx < CTX
    assert any(t.startswith(f"context cut from {CTX} to {result.ctx}") for t in result.tradeoffs)
    assert_within_budgets(result)


def test_a_larger_margin_plans_less_on_the_gpu(qwen3next_80b: ModelShape, machine) -> None:
    hardware, request = machine((16,)), pinned(1)
    first = plan(qwen3next_80b, hardware, request)
    second = replan_with_margin(qwen3next_80b, hardware, request, extra_bytes=2 * GIB)
    assert second.gpu_expert_layers < first.gpu_expert_layers
    assert gpu(second).budget_bytes == gpu(first).budget_bytes - 2 * GIB


def test_planning_is_deterministic_and_serialisable(qwen3next_80b: ModelShape, machine) -> None:
    first = plan(qwen3next_80b, machine((16,)), pinned(4))
    second = plan(qwen3next_80b, machine((16,)), pinned(4))
    document = first.to_json()
    assert document == second.to_json()
    assert json.loads(json.dumps(document)) == document


def test_json_form_has_the_documented_fields(qwen3next_80b: ModelShape, machine) -> None:
    document = plan(qwen3next_80b, machine((16,)), pinned(1)).to_json()
    for key in ("devices", "layers", "n_gpu_layers", "tensor_overrides", "ctx", "parallel", "kv_type"):
        assert key in document
    for key in ("n_batch", "n_ubatch", "predicted", "binding_constraint", "tradeoffs"):
        assert key in document
    device_keys = {"name", "kind", "budget_bytes", "weights_bytes", "kv_bytes", "recurrent_bytes", "compute_bytes"}
    for device in document["devices"]:
        assert device_keys | {"total_bytes"} <= set(device)
        assert device["kind"] in ("gpu", "cpu")
        assert device["total_bytes"] == sum(
            device[k] for k in ("weights_bytes", "kv_bytes", "recurrent_bytes", "compute_bytes", "overhead_bytes")
        )
    assert [layer["index"] for layer in document["layers"]] == list(range(48))
    assert {layer["experts_device"] for layer in document["layers"]} == {"CPU", "CUDA0"}
    assert document["tensor_overrides"][0]["device"] == "CPU"
    assert document["kv_type"] == "f16"
    assert document["predicted"]["decode_tokens_per_s"] > 0
    assert document["predicted"]["prefill_tokens_per_s"] > 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ctx": 0}, "ctx must be at least 1"),
        ({"parallel": 0}, "parallel must be at least 1"),
        ({"n_ubatch": 1024, "n_batch": 512}, "cannot exceed n_batch"),
        ({"kv_type": "q5_1"}, "unknown KV cache type"),
    ],
)
def test_bad_requests_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        replace(PlanRequest(), **changes)


def test_a_gpu_too_small_to_help_is_left_out(qwen3next_80b: ModelShape, machine) -> None:
    # 1 GiB cannot even hold the CUDA runtime and a prompt batch's copy of one expert tensor
    result = plan(qwen3next_80b, machine((1,)), pinned(1))
    assert result.n_gpu_layers == 0
    assert not result.op_offload
    assert [d.name for d in result.devices] == ["CPU"]
    assert any("too small" in t for t in result.tradeoffs)
    assert placement_for(result).backend_config_kwargs()["op_offload"] is False
