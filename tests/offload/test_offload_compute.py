"""The compute-buffer replay against sizes llama.cpp 0c1e57098 reported on this machine, and its mechanics."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from offload.compute import (
    CPU_DEVICE,
    ComputeConfig,
    _DynAllocator,
    approximate_compute_buffer_sizes,
    compute_buffer_sizes,
)
from offload.gguf_shape import KvType, ModelShape, read_model_shape
from offload.hardware import MIB, HardwareProfile
from offload.planner import PlanRequest, plan
from offload.shape_fixture import F32, Q4_K, HeaderModel, TensorSpec, write_header_only_gguf
from registry.models import resolve_model

MachineFactory = Callable[..., HardwareProfile]

# "sched_reserve: CPU compute buffer size = ... MiB" for SmolLM2-135M-Instruct Q4_1 (flash attention auto,
# use_extra_bufts off), as (n_ctx, n_seq_max, n_ubatch, n_batch, n_outputs_max, KV type) -> MiB
SMOLLM2_REPORTED = [
    ((4096, 1, 512, 2048, 1, KvType.F16), 17.51),
    ((4096, 1, 512, 2048, 0, KvType.F16), 98.25),
    ((4096, 4, 512, 2048, 4, KvType.F16), 14.51),
    ((4096, 1, 256, 2048, 1, KvType.F16), 8.76),
    ((8192, 1, 512, 2048, 1, KvType.F16), 21.51),
    ((2048, 8, 512, 2048, 8, KvType.F16), 13.76),
    ((1024, 3, 128, 256, 0, KvType.F16), 24.57),
    ((4096, 2, 512, 2048, 0, KvType.Q8_0), 99.38),
    ((4096, 1, 512, 2048, 1, KvType.Q4_0), 16.42),
    ((16384, 4, 1024, 1024, 0, KvType.F16), 196.50),
]


@pytest.fixture(scope="module")
def smollm2() -> ModelShape:
    return read_model_shape(resolve_model("smollm2-135m-instruct").path)


@pytest.mark.parametrize(("settings", "reported_mib"), SMOLLM2_REPORTED)
def test_smollm2_cpu_compute_buffer_matches_llama_cpp(
    smollm2: ModelShape, settings: tuple[int, int, int, int, int, KvType], reported_mib: float
) -> None:
    n_ctx, n_seq, n_ubatch, n_batch, n_outputs_max, kv_type = settings
    n_ctx_padded = -(-n_ctx // 256) * 256
    n_ctx_seq = -(-(n_ctx_padded // n_seq) // 256) * 256
    config = ComputeConfig(
        n_ctx_seq=n_ctx_seq,
        n_seq=n_seq,
        n_ubatch=n_ubatch,
        n_batch=n_batch,
        n_outputs_max=n_outputs_max,
        kv_type=kv_type,
    )
    sizes = compute_buffer_sizes(smollm2, config)
    assert set(sizes) == {CPU_DEVICE}
    assert sizes[CPU_DEVICE] / MIB == pytest.approx(reported_mib, abs=0.006)


def test_allocator_reuses_the_best_fitting_free_block_and_merges_neighbours() -> None:
    allocator = _DynAllocator(alignment=32)
    a = allocator.alloc(100)  # padded to 128
    b = allocator.alloc(64)
    c = allocator.alloc(256)
    assert (a, b, c) == (0, 128, 192)
    allocator.free(a, 100)
    allocator.free(c, 256)  # the block at the end merges with the free tail
    assert allocator.alloc(96) == 0  # the freed 128-byte hole fits best
    allocator.free(b, 64)
    allocator.free(0, 96)
    assert allocator.alloc(448) == 0  # everything merged back into one block
    assert allocator.max_size == 448


def test_ram_resident_experts_are_copied_into_the_gpu_compute_buffer(qwen3next_80b: ModelShape) -> None:
    gpu_layers = (0,) * qwen3next_80b.n_layer
    common = {"n_ctx_seq": 32768, "n_seq": 1, "n_ubatch": 512, "n_batch": 512, "n_gpus": 1, "output_device": 0}
    experts_in_ram = compute_buffer_sizes(
        qwen3next_80b,
        ComputeConfig(layer_devices=gpu_layers, expert_devices=(CPU_DEVICE,) * qwen3next_80b.n_layer, **common),
    )
    experts_on_gpu = compute_buffer_sizes(
        qwen3next_80b, ComputeConfig(layer_devices=gpu_layers, expert_devices=gpu_layers, **common)
    )
    largest_expert_tensor = max(t.n_bytes for t in qwen3next_80b.tensors if "_exps" in t.name)
    assert largest_expert_tensor == 420 * MIB  # a q6_K ffn_down_exps
    # op_offload: prompt batches use RAM-resident experts on the GPU, one weight copy at a time
    assert experts_in_ram[0] > largest_expert_tensor
    assert experts_in_ram[0] > experts_on_gpu[0] + 100 * MIB
    # the logits of a 512-token micro-batch (151936 x 512 f32) always fit in the GPU buffer
    assert experts_on_gpu[0] > 151936 * 512 * 4
    assert experts_in_ram[CPU_DEVICE] < 100 * MIB


def test_quantized_kv_needs_f16_copies_for_cuda_flash_attention(qwen3next_80b: ModelShape) -> None:
    layers = (0,) * qwen3next_80b.n_layer
    common = {"n_seq": 1, "n_ubatch": 512, "n_batch": 512, "n_gpus": 1, "output_device": 0}
    f16 = compute_buffer_sizes(
        qwen3next_80b, ComputeConfig(n_ctx_seq=131072, layer_devices=layers, expert_devices=layers, **common)
    )
    q8 = compute_buffer_sizes(
        qwen3next_80b,
        ComputeConfig(n_ctx_seq=131072, kv_type=KvType.Q8_0, layer_devices=layers, expert_devices=layers, **common),
    )
    # fattn.cu: K and V are converted to f16 next to the attention output (131072 x 512 x 2 bytes each),
    # live together with the f16 mask of the micro-batch (131072 x 512 x 2 bytes)
    kv_f16_copies = 2 * 131072 * 512 * 2
    mask = 131072 * 512 * 2
    assert q8[0] >= kv_f16_copies + mask
    assert f16[0] < kv_f16_copies + mask + 200 * MIB


def test_pipeline_parallelism_keeps_four_copies_of_the_inputs(dense_8b: ModelShape) -> None:
    # two GPUs holding every layer and the output, no overrides: ggml_backend_sched keeps 4 input copies
    layers = (0,) * 16 + (1,) * 16
    common = {"n_ctx_seq": 8192, "n_seq": 1, "n_ubatch": 512, "n_batch": 512, "n_gpus": 2}
    split = compute_buffer_sizes(dense_8b, ComputeConfig(layer_devices=layers, output_device=1, **common))
    single = compute_buffer_sizes(
        dense_8b, ComputeConfig(layer_devices=(0,) * 32, output_device=0, **{**common, "n_gpus": 1})
    )
    mask = 8192 * 512 * 2  # the largest graph input, held in host memory before its copy to the GPUs
    assert split[CPU_DEVICE] >= single[CPU_DEVICE] + 3 * mask


def test_an_unknown_graph_gets_an_approximate_estimate(tmp_path: Path, machine: MachineFactory) -> None:
    # a phi3-style model: fused QKV projections the replayed graphs do not build
    n_embd, n_ff, n_vocab = 1024, 4096, 32000
    tensors = [
        TensorSpec("token_embd.weight", (n_embd, n_vocab), Q4_K),
        TensorSpec("output_norm.weight", (n_embd,), F32),
        TensorSpec("output.weight", (n_embd, n_vocab), Q4_K),
    ]
    for il in range(4):
        tensors += [
            TensorSpec(f"blk.{il}.attn_norm.weight", (n_embd,), F32),
            TensorSpec(f"blk.{il}.attn_qkv.weight", (n_embd, 3 * n_embd), Q4_K),
            TensorSpec(f"blk.{il}.attn_output.weight", (n_embd, n_embd), Q4_K),
            TensorSpec(f"blk.{il}.ffn_norm.weight", (n_embd,), F32),
            TensorSpec(f"blk.{il}.ffn_up.weight", (n_embd, 2 * n_ff), Q4_K),
            TensorSpec(f"blk.{il}.ffn_down.weight", (n_ff, n_embd), Q4_K),
        ]
    metadata: dict[str, int | float | str | list[int] | list[str]] = {
        "phi3.block_count": 4,
        "phi3.context_length": 4096,
        "phi3.embedding_length": n_embd,
        "phi3.feed_forward_length": n_ff,
        "phi3.attention.head_count": 16,
        "phi3.attention.head_count_kv": 16,
    }
    model = HeaderModel("phi3", "phi3-like", metadata, tuple(tensors), n_vocab)
    shape = read_model_shape(write_header_only_gguf(model, tmp_path / "phi3-like.gguf"))
    config = ComputeConfig(n_ctx_seq=4096, n_seq=1, n_ubatch=512, n_batch=512)
    sizes = compute_buffer_sizes(shape, config)
    assert sizes == approximate_compute_buffer_sizes(shape, config)
    assert sizes[CPU_DEVICE] >= n_vocab * 512 * 4 + 4096 * 512 * 2
    result = plan(shape, machine((8,)), PlanRequest(ctx=4096))
    assert result.n_gpu_layers == 5
