"""Plans on the Qwen3-Next-80B-A3B Q4_K_M shape and on dense models, against hand-described machines.

Two kinds of assertion, kept apart:
- Numbers with a source outside the planner are asserted exactly, and each says where it comes from: the
  shape (offload/shape_fixture.py reproduces the published GGUF: 48 layers, full attention in every 4th, 2 KV
  heads of 256, Gated DeltaNet with d_inner 4096, d_state 128, 16 groups, d_conv 4; 512 experts, n_vocab
  151936), llama.cpp's allocation rules (cited at each use; src/ paths are llama.cpp 0c1e57098, the one
  vendored in llama-cpp-python 0.3.36), and the planner's documented margins (offload/README.md).
- What only the planner decides (how many layers' routed experts go to the GPU: 13 with one slot, 11 with four
  slots and an f16 KV cache in README.md's example) is not pinned: it is asserted through invariants. Every
  device stays within its budget, no further expert layer fits in what a GPU has left, and the plans order
  themselves as their inputs say they must (more KV cache, fewer expert layers; a bigger GPU, more).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from offload.gguf_shape import KvType, ModelShape, TensorKind
from offload.hardware import GIB
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

# llama.cpp rules, applied to the 80B shape (see the module docstring for the shape's numbers)
N_LAYER = 48
N_ATTENTION_LAYERS = 12  # full attention in layers 3, 7, ..., 47; the other 36 are Gated DeltaNet
N_RECURRENT_LAYERS = 36
# src/llama-kv-cache.cpp: one K and one V row of n_embd_k_gqa = n_head_kv * head_dim (2 * 256) values per
# attention layer and cell; f16 is 2 bytes a value, q8_0 34 bytes per block of 32 values (ggml.c type traits)
KV_F16_BYTES_PER_TOKEN = N_ATTENTION_LAYERS * 2 * (2 * 256) * 2
KV_Q8_0_BYTES_PER_TOKEN = N_ATTENTION_LAYERS * 2 * (2 * 256) // 32 * 34
# src/llama-hparams.cpp: n_embd_r = (d_conv - 1) * (d_inner + 2 * n_group * d_state), n_embd_s = d_state * d_inner,
# both f32 (llama-model.cpp create_memory), one row each per recurrent layer and sequence
RECURRENT_BYTES_PER_SEQUENCE = N_RECURRENT_LAYERS * ((4 - 1) * (4096 + 2 * 16 * 128) + 128 * 4096) * 4
# llama_model_params.n_gpu_layers: the repeating layers plus the output layer, which counts as one
ALL_LAYERS_ON_GPU = N_LAYER + 1
# src/llama-context.cpp (output buffer) / graph: the logits of one micro-batch, n_vocab f32 per token
LOGITS_BYTES_PER_TOKEN = 151936 * 4


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
    assert in_ram, "every expert layer is on the GPU: nothing left to check"
    smallest = min(shape.layers[i].expert_bytes for i in in_ram)
    for device in result.devices:
        if device.kind == "gpu":
            assert device.free_bytes < smallest


def assert_fills_the_gpu_with_expert_layers(result: Plan, shape: ModelShape) -> None:
    """The planner's own choice, asserted through what must hold of it rather than its count."""
    assert result.gpu_expert_layers > 0
    assert_within_budgets(result)
    assert_no_more_expert_layer_fits(result, shape)


def test_16gib_gpu_one_slot_fills_the_gpu_with_expert_layers(qwen3next_80b: ModelShape, machine) -> None:
    result = plan(qwen3next_80b, machine((16,)), pinned(1))
    # every layer's attention / SSM, norms, router and shared expert, and the output layer, on the GPU
    assert result.n_gpu_layers == ALL_LAYERS_ON_GPU
    assert {layer.device for layer in result.layers} == {"CUDA0"}
    assert result.output_device == "CUDA0"
    assert_fills_the_gpu_with_expert_layers(result, qwen3next_80b)
    device = gpu(result)
    # the planner's documented GPU margin, max(256 MiB, 2%), and CUDA runtime allowance (offload/README.md)
    assert device.budget_bytes == 16 * GIB - max(GPU_MIN_MARGIN, int(16 * GIB * 0.02))
    assert device.overhead_bytes == GPU_RUNTIME_OVERHEAD
    assert device.kv_bytes == CTX * KV_F16_BYTES_PER_TOKEN  # 32768 is already a multiple of the 256 padding
    assert device.recurrent_bytes == RECURRENT_BYTES_PER_SEQUENCE
    non_expert_on_gpu = qwen3next_80b.non_expert_bytes - qwen3next_80b.embedding_bytes
    expert_on_gpu = sum(layer.expert_bytes for layer in result.layers if layer.experts_device == "CUDA0")
    # rel 1e-3: CUDA pads quantized rows to 512 values (ggml-cuda.cu, MATRIX_ROW_PADDING)
    assert device.weights_bytes == pytest.approx(non_expert_on_gpu + expert_on_gpu, rel=1e-3)
    # the compute buffer holds at least the largest RAM-resident expert tensor, copied in for prompt batches
    # (ggml-backend.cpp op_offload: 420 MiB, ffn_down_exps in q6_K), and the logits of a micro-batch (297 MiB);
    # how much more is the compute replay's business (tests/offload/test_offload_compute.py)
    largest_ram_expert = max(
        t.n_bytes
        for t in qwen3next_80b.tensors
        if t.kind == TensorKind.ROUTED_EXPERTS and t.layer in set(ram_expert_layers(result))
    )
    assert device.compute_bytes >= max(largest_ram_expert, 512 * LOGITS_BYTES_PER_TOKEN)
    cpu = result.device("CPU")
    # token_embd stays on the CPU whatever n_gpu_layers says (llama-model.cpp: the input layer's device is the CPU)
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
    assert len(matched) == 3 * len(ram_expert_layers(result))  # ffn_gate_exps, ffn_up_exps, ffn_down_exps


def test_four_slots_cost_expert_layers_unless_the_kv_cache_is_q8_0(qwen3next_80b: ModelShape, machine) -> None:
    one = plan(qwen3next_80b, machine((16,)), pinned(1))
    f16 = plan(qwen3next_80b, machine((16,)), pinned(4))
    # a non-unified cache gives each of the 4 sequences its own 32768 cells (llama-context.cpp, n_ctx_seq);
    # the recurrent memory holds one state per sequence (llama-memory-recurrent.cpp, mem_size = n_seq_max)
    assert gpu(f16).kv_bytes == 4 * CTX * KV_F16_BYTES_PER_TOKEN  # 3 GiB
    assert gpu(f16).recurrent_bytes == 4 * RECURRENT_BYTES_PER_SEQUENCE
    q8 = plan(qwen3next_80b, machine((16,)), pinned(4, KvType.Q8_0))
    assert gpu(q8).kv_bytes == 4 * CTX * KV_Q8_0_BYTES_PER_TOKEN
    for result in (one, f16, q8):
        assert result.n_gpu_layers == ALL_LAYERS_ON_GPU
        assert_fills_the_gpu_with_expert_layers(result, qwen3next_80b)
    # 2.25 GiB more KV cache than one slot, and each expert layer is 864-996 MiB: at least 2 layers fewer
    assert f16.gpu_expert_layers <= one.gpu_expert_layers - 2
    assert q8.gpu_expert_layers > f16.gpu_expert_layers  # the q8_0 cache is 1.41 GiB smaller
    assert q8.predicted.decode_tokens_per_s > f16.predicted.decode_tokens_per_s
    assert q8.flash_attn == "on"  # llama.cpp refuses a quantized V cache without flash attention


def test_the_planner_trades_kv_precision_for_expert_layers_and_says_so(qwen3next_80b: ModelShape, machine) -> None:
    result = plan(qwen3next_80b, machine((16,)), PlanRequest(ctx=CTX, parallel=4, n_ubatch=512))
    f16 = plan(qwen3next_80b, machine((16,)), pinned(4))
    assert result.kv_type == KvType.Q8_0
    assert result.gpu_expert_layers == plan(qwen3next_80b, machine((16,)), pinned(4, KvType.Q8_0)).gpu_expert_layers
    gained = result.gpu_expert_layers - f16.gpu_expert_layers
    assert any("q8_0 instead of f16" in t and f"{gained} more expert layers" in t for t in result.tradeoffs)
    one_slot = plan(qwen3next_80b, machine((16,)), PlanRequest(ctx=CTX, parallel=1, n_ubatch=512))
    # with one slot the same expert layers fit either way: no reason to lose precision
    assert plan(qwen3next_80b, machine((16,)), pinned(1)).gpu_expert_layers == (
        plan(qwen3next_80b, machine((16,)), pinned(1, KvType.Q8_0)).gpu_expert_layers
    )
    assert one_slot.kv_type == KvType.F16
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
    assert result.n_gpu_layers == ALL_LAYERS_ON_GPU
    assert_fills_the_gpu_with_expert_layers(result, qwen3next_80b)
    # 6.35 GiB more GPU memory, each expert layer at most 996 MiB: at least 6 more layers than on 16 GiB
    assert result.gpu_expert_layers >= plan(qwen3next_80b, machine((16,)), pinned(1)).gpu_expert_layers + 6


def test_two_gpus_split_the_layers_in_contiguous_runs(qwen3next_80b: ModelShape, machine) -> None:
    result = plan(qwen3next_80b, machine((16, 24e9 / GIB)), pinned(1))
    assert result.n_gpu_layers == ALL_LAYERS_ON_GPU
    assert sum(result.tensor_split) == ALL_LAYERS_ON_GPU
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
    assert "\n" not in message
    numbers = re.search(r"needs ([\d.]+) GiB \(weights ([\d.]+) GiB.*offers ([\d.]+) GiB.* ([\d.]+) GiB short", message)
    assert numbers is not None, message
    needs, weights, offers, short = (float(n) for n in numbers.groups())
    assert weights == round(qwen3next_80b.total_bytes / GIB, 2)  # 45.08 GiB: the whole model
    # the documented margins: GPU max(256 MiB, 2%) of 8 GiB, RAM max(1 GiB, 5%) of 16 GiB (offload/README.md)
    assert offers == pytest.approx(8 - 0.25 + 16 - 1, abs=0.01)
    assert needs > weights + 1  # and the runtime allowances (512 MiB CUDA, 512 MiB process), KV, state, compute
    assert short == pytest.approx(needs - offers, abs=0.02)


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
