"""Reading a model's shape from its GGUF header: the 80B fixture, SmolLM2, split files and bad files."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from offload.gguf_shape import GgufError, KvType, ModelShape, TensorKind, classify_tensor, read_model_shape
from offload.hardware import GIB, MIB
from registry.models import resolve_model

QWEN3NEXT_80B_BYTES = 48_405_005_312  # Qwen3-Next-80B-A3B-Instruct Q4_K_M, as llama.cpp reports it


def test_80b_header_has_the_published_inventory(qwen3next_80b: ModelShape) -> None:
    shape = qwen3next_80b
    assert shape.architecture == "qwen3next"
    assert len(shape.tensors) == 807
    types = Counter(t.type_name for t in shape.tensors)
    assert types == {"F32": 313, "F16": 48, "Q4_K": 391, "Q6_K": 55}
    assert shape.total_bytes == QWEN3NEXT_80B_BYTES
    assert (shape.n_layer, shape.n_embd, shape.n_vocab) == (48, 2048, 151936)
    assert (shape.n_expert, shape.n_expert_used, shape.n_ff_exp) == (512, 10, 512)


def test_80b_layers_are_grouped_by_kind(qwen3next_80b: ModelShape) -> None:
    shape = qwen3next_80b
    attention = [layer.index for layer in shape.layers if layer.has_kv]
    assert attention == list(range(3, 48, 4))
    assert all(layer.is_recurrent for layer in shape.layers if layer.index not in attention)
    # routed experts: 864 MiB per layer with a q4_K down projection, 996 MiB with q6_K; 43.59 GiB in all
    assert Counter(layer.expert_bytes for layer in shape.layers) == {864 * MIB: 24, 996 * MIB: 24}
    assert shape.expert_bytes == (24 * 864 + 24 * 996) * MIB
    assert shape.expert_bytes / GIB == pytest.approx(43.59, abs=0.01)
    assert shape.embedding_bytes == 2048 * 151936 * 144 // 256  # token_embd q4_K, 167 MiB
    recurrent = shape.layers[0]
    assert recurrent.mixer_kind == "ssm"
    assert recurrent.bytes_of(TensorKind.ATTENTION) == 0
    assert recurrent.bytes_of(TensorKind.SSM) > 0
    full = shape.layers[3]
    assert full.mixer_kind == "attention"
    assert full.bytes_of(TensorKind.SSM) == 0
    for layer in shape.layers:
        assert layer.bytes_of(TensorKind.SHARED_EXPERT) > 0
        assert layer.bytes_of(TensorKind.ROUTER) == 2048 * 512 * 4
        assert layer.bytes_of(TensorKind.NORM) == 2 * 2048 * 4


def test_80b_kv_and_recurrent_state_sizes(qwen3next_80b: ModelShape) -> None:
    shape = qwen3next_80b
    # 12 attention layers x 2 KV heads x 256 dims, K and V
    assert shape.kv_bytes_per_token(KvType.F16) == 24_576
    assert shape.kv_bytes_per_token(KvType.Q8_0) == 13_056
    assert shape.kv_bytes_per_token(KvType.Q4_0) == 12 * 2 * 512 // 32 * 18
    # 36 Gated DeltaNet layers x (conv 3 x 8192 + state 128 x 4096) f32 = 75.4 MiB per sequence
    assert shape.recurrent_bytes_per_sequence == 36 * (3 * 8192 + 128 * 4096) * 4
    assert shape.recurrent_bytes_per_sequence / MIB == pytest.approx(75.375)


def test_80b_fixture_is_the_full_size_but_sparse(qwen3next_80b_gguf: Path) -> None:
    stat = qwen3next_80b_gguf.stat()
    assert stat.st_size > QWEN3NEXT_80B_BYTES
    assert stat.st_blocks * 512 < 64 * MIB


def test_smollm2_shape_matches_what_llama_cpp_maps() -> None:
    shape = read_model_shape(resolve_model("smollm2-135m-instruct").path)
    assert shape.architecture == "llama"
    assert (shape.n_layer, shape.n_embd, shape.n_vocab) == (30, 576, 49152)
    assert not shape.is_moe and not shape.has_recurrent_layers
    assert shape.output_bytes == 576 * 4  # only output_norm: the output matrix is tied to token_embd
    first = min(t.offset for t in shape.tensors)
    last = max(t.offset + t.n_bytes for t in shape.tensors)
    assert last - first == 96_576_768  # llama.cpp: "CPU_Mapped model buffer size = 92.10 MiB"
    assert shape.kv_bytes_per_token(KvType.F16) == 30 * 2 * 192 * 2


def test_tiny_qwen3next_has_one_attention_layer(tiny_qwen3next_gguf: Path) -> None:
    shape = read_model_shape(tiny_qwen3next_gguf)
    assert [layer.has_kv for layer in shape.layers] == [False, False, False, True]
    assert [layer.is_recurrent for layer in shape.layers] == [True, True, True, False]
    assert shape.ssm is not None
    assert shape.recurrent_bytes_per_sequence == 3 * (shape.ssm.n_embd_r + shape.ssm.n_embd_s) * 4
    # on a recurrent layer the fused projections belong to the linear attention
    kinds = {t.name.split(".", 2)[2]: t.kind for t in shape.layer_tensors(0)}
    assert kinds["attn_qkv.weight"] == TensorKind.SSM
    assert kinds["ffn_gate_exps.weight"] == TensorKind.ROUTED_EXPERTS


@pytest.mark.parametrize(
    ("name", "layer", "kind"),
    [
        ("token_embd.weight", None, TensorKind.EMBEDDING),
        ("output.weight", None, TensorKind.OUTPUT),
        ("output_norm.weight", None, TensorKind.OUTPUT),
        ("blk.7.ffn_down_exps.weight", 7, TensorKind.ROUTED_EXPERTS),
        ("blk.7.ffn_gate_up_exps.weight", 7, TensorKind.ROUTED_EXPERTS),
        ("blk.0.ffn_up_shexp.weight", 0, TensorKind.SHARED_EXPERT),
        ("blk.0.ffn_gate_inp_shexp.weight", 0, TensorKind.SHARED_EXPERT),
        ("blk.0.ffn_gate_inp.weight", 0, TensorKind.ROUTER),
        ("blk.12.ffn_gate.weight", 12, TensorKind.DENSE_FFN),
        ("blk.3.attn_q.weight", 3, TensorKind.ATTENTION),
        ("blk.3.attn_q_norm.weight", 3, TensorKind.ATTENTION),
        ("blk.3.attn_norm.weight", 3, TensorKind.NORM),
        ("blk.3.post_attention_norm.weight", 3, TensorKind.NORM),
        ("blk.1.ssm_conv1d.weight", 1, TensorKind.SSM),
        ("blk.1.ssm_norm.weight", 1, TensorKind.SSM),
    ],
)
def test_tensor_names_are_classified(name: str, layer: int | None, kind: TensorKind) -> None:
    assert classify_tensor(name) == (layer, kind)


def _write_small_model(path: Path, split_max_tensors: int = 0) -> None:
    writer = GGUFWriter(path, "llama", split_max_tensors=split_max_tensors)
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_context_length(2048)
    writer.add_tensor("token_embd.weight", np.zeros((100, 64), dtype=np.float32))
    for layer in range(2):
        writer.add_tensor(f"blk.{layer}.attn_k.weight", np.zeros((32, 64), dtype=np.float16))
        writer.add_tensor(f"blk.{layer}.ffn_up.weight", np.zeros((128, 64), dtype=np.float16))
    writer.add_tensor("output_norm.weight", np.zeros(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_split_model_is_read_across_its_shards(tmp_path: Path) -> None:
    _write_small_model(tmp_path / "small.gguf", split_max_tensors=2)
    shards = sorted(tmp_path.glob("small-*-of-*.gguf"))
    assert len(shards) == 3
    shape = read_model_shape(shards[0])
    assert shape.file_sizes == tuple(p.stat().st_size for p in shards)
    assert len(shape.tensors) == 6
    assert sorted({t.file_index for t in shape.tensors}) == [0, 1, 2]
    assert shape.total_bytes == 100 * 64 * 4 + 2 * (32 * 64 * 2 + 128 * 64 * 2) + 64 * 4
    assert shape.layers[0].n_embd_k_gqa == 2 * 16  # 2 KV heads x (64 / 4)


def test_missing_shard_is_a_clear_error(tmp_path: Path) -> None:
    _write_small_model(tmp_path / "small.gguf", split_max_tensors=2)
    (tmp_path / "small-00003-of-00003.gguf").unlink()
    with pytest.raises(GgufError, match=r"00003-of-00003\.gguf"):
        read_model_shape(tmp_path / "small-00001-of-00003.gguf")


def test_not_a_gguf_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.gguf"
    path.write_bytes(b"this is not a model\n" * 10)
    with pytest.raises(GgufError, match="not a GGUF file"):
        read_model_shape(path)


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "small.gguf"
    _write_small_model(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(GgufError, match="past the end of the file"):
        read_model_shape(path)
    path.write_bytes(data[:40])
    with pytest.raises(GgufError, match="truncated"):
        read_model_shape(path)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(GgufError, match="no such file"):
        read_model_shape(tmp_path / "absent.gguf")
