"""Header-only GGUFs with the exact shape of real models, for planner tests and benchmarks.

`write_header_only_gguf` writes a real GGUF header (metadata and tensor descriptors) and extends the file to
the size the tensor data would take without writing it: the data section is a sparse hole, so a file the
size of Qwen3-Next-80B-A3B Q4_K_M (45 GiB) costs a few megabytes of disk. Only header readers can use it;
llama.cpp would load zeros.

`qwen3next_80b_a3b_q4_k_m()` reproduces the published Qwen3-Next-80B-A3B-Instruct Q4_K_M layout: 48 layers
(full attention in layers 3, 7, ..., 47, Gated DeltaNet in the other 36), 512 experts (10 used) plus a shared
expert, 807 tensors (f32 313, f16 48, q4_K 391, q6_K 55), 48,405,005,312 bytes of tensor data. Which tensors
get q6_K follows llama.cpp's Q4_K_M recipe (src/llama-quant.cpp: `use_more_bits` for attn_v and ffn_down,
q6_K for output.weight).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

Q4_K = GGMLQuantizationType.Q4_K
Q6_K = GGMLQuantizationType.Q6_K
F32 = GGMLQuantizationType.F32
F16 = GGMLQuantizationType.F16


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # ggml order: ne0 first
    ggml_type: GGMLQuantizationType

    @property
    def n_bytes(self) -> int:
        block_size, type_size = GGML_QUANT_SIZES[self.ggml_type]
        n_elements = int(np.prod(self.shape))
        return n_elements // block_size * type_size


@dataclass(frozen=True)
class HeaderModel:
    """Metadata and tensors of a model, without its weights."""

    architecture: str
    name: str
    metadata: dict[str, int | float | str | list[int] | list[str]]
    tensors: tuple[TensorSpec, ...]
    n_vocab: int

    @property
    def data_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)


def write_header_only_gguf(model: HeaderModel, path: Path) -> Path:
    """Write `model`'s GGUF header and extend the file sparsely to its full size; returns `path`."""
    writer = GGUFWriter(path, model.architecture)
    writer.add_name(model.name)
    for key, value in model.metadata.items():
        _add_metadata(writer, key, value)
    # a vocabulary of the real size: header readers must walk it, which is what makes headers slow to parse
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(model.n_vocab)])
    writer.add_token_types([1] * model.n_vocab)
    writer.add_token_merges([f"t{i} t{i + 1}" for i in range(0, model.n_vocab - 1, 2)])
    for tensor in model.tensors:
        # numpy order is the reverse of ggml's
        writer.add_tensor_info(
            tensor.name, tuple(reversed(tensor.shape)), np.dtype(np.float32), tensor.n_bytes, tensor.ggml_type
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    header_size = path.stat().st_size
    alignment = writer.data_alignment
    data_start = -(-header_size // alignment) * alignment
    data_size = sum(-(-t.n_bytes // alignment) * alignment for t in model.tensors)
    with path.open("r+b") as stream:
        stream.truncate(data_start + data_size)
        os.fsync(stream.fileno())
    return path


def _add_metadata(writer: GGUFWriter, key: str, value: int | float | str | list[int] | list[str]) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quant.cpp: the layers Q4_K_M gives q6_K (first and last eighth, every third in between)."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def qwen3next_80b_a3b_q4_k_m() -> HeaderModel:
    n_layer, n_embd, n_vocab = 48, 2048, 151936
    n_expert, n_ff_exp, n_ff_shexp = 512, 512, 512
    head_dim, n_head, n_head_kv = 256, 16, 2
    d_state, n_group, dt_rank, d_conv = 128, 16, 32, 4
    key_dim, value_dim = d_state * n_group, d_state * dt_rank
    tensors: list[TensorSpec] = [
        TensorSpec("token_embd.weight", (n_embd, n_vocab), Q4_K),
        TensorSpec("output_norm.weight", (n_embd,), F32),
        TensorSpec("output.weight", (n_embd, n_vocab), Q6_K),
    ]
    i_attention = 0
    for il in range(n_layer):
        blk = f"blk.{il}."
        tensors += [
            TensorSpec(blk + "attn_norm.weight", (n_embd,), F32),
            TensorSpec(blk + "post_attention_norm.weight", (n_embd,), F32),
        ]
        if (il + 1) % 4:
            tensors += [
                TensorSpec(blk + "ssm_in.weight", (n_embd, 2 * key_dim + 2 * value_dim), Q4_K),
                TensorSpec(blk + "ssm_conv1d.weight", (d_conv, 2 * key_dim + value_dim), F32),
                TensorSpec(blk + "ssm_dt.bias", (dt_rank,), F32),
                TensorSpec(blk + "ssm_a", (dt_rank,), F32),
                TensorSpec(blk + "ssm_ba.weight", (n_embd, 2 * dt_rank), Q4_K),
                TensorSpec(blk + "ssm_norm.weight", (d_state,), F32),
                TensorSpec(blk + "ssm_out.weight", (value_dim, n_embd), Q4_K),
            ]
        else:
            v_type = Q6_K if use_more_bits(i_attention, n_layer // 4) else Q4_K
            i_attention += 1
            tensors += [
                TensorSpec(blk + "attn_q.weight", (n_embd, head_dim * n_head * 2), Q4_K),
                TensorSpec(blk + "attn_k.weight", (n_embd, head_dim * n_head_kv), Q4_K),
                TensorSpec(blk + "attn_v.weight", (n_embd, head_dim * n_head_kv), v_type),
                TensorSpec(blk + "attn_output.weight", (head_dim * n_head, n_embd), Q4_K),
                TensorSpec(blk + "attn_q_norm.weight", (head_dim,), F32),
                TensorSpec(blk + "attn_k_norm.weight", (head_dim,), F32),
            ]
        down_type = Q6_K if use_more_bits(il, n_layer) else Q4_K
        tensors += [
            TensorSpec(blk + "ffn_gate_inp.weight", (n_embd, n_expert), F32),
            TensorSpec(blk + "ffn_gate_exps.weight", (n_embd, n_ff_exp, n_expert), Q4_K),
            TensorSpec(blk + "ffn_up_exps.weight", (n_embd, n_ff_exp, n_expert), Q4_K),
            TensorSpec(blk + "ffn_down_exps.weight", (n_ff_exp, n_embd, n_expert), down_type),
            TensorSpec(blk + "ffn_gate_inp_shexp.weight", (n_embd,), F16),
            TensorSpec(blk + "ffn_gate_shexp.weight", (n_embd, n_ff_shexp), Q4_K),
            TensorSpec(blk + "ffn_up_shexp.weight", (n_embd, n_ff_shexp), Q4_K),
            TensorSpec(blk + "ffn_down_shexp.weight", (n_ff_shexp, n_embd), down_type),
        ]
    prefix = "qwen3next."
    metadata: dict[str, int | float | str | list[int] | list[str]] = {
        prefix + "block_count": n_layer,
        prefix + "context_length": 262144,
        prefix + "embedding_length": n_embd,
        prefix + "feed_forward_length": 5120,
        prefix + "attention.head_count": n_head,
        prefix + "attention.head_count_kv": n_head_kv,
        prefix + "attention.key_length": head_dim,
        prefix + "attention.value_length": head_dim,
        prefix + "rope.dimension_count": 64,
        prefix + "rope.freq_base": 10000000.0,
        prefix + "attention.layer_norm_rms_epsilon": 1e-6,
        prefix + "expert_count": n_expert,
        prefix + "expert_used_count": 10,
        prefix + "expert_feed_forward_length": n_ff_exp,
        prefix + "expert_shared_feed_forward_length": n_ff_shexp,
        prefix + "ssm.conv_kernel": d_conv,
        prefix + "ssm.inner_size": value_dim,
        prefix + "ssm.state_size": d_state,
        prefix + "ssm.time_step_rank": dt_rank,
        prefix + "ssm.group_count": n_group,
        "general.file_type": 15,  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    }
    return HeaderModel("qwen3next", "Qwen3-Next-80B-A3B-Instruct (header only)", metadata, tuple(tensors), n_vocab)


def dense_model(
    n_layer: int, n_embd: int, n_ff: int, n_head: int, n_head_kv: int, n_vocab: int, weight_type: GGMLQuantizationType
) -> HeaderModel:
    """A llama-architecture dense model of the given size (all matrices of one type, norms f32)."""
    head_dim = n_embd // n_head
    tensors: list[TensorSpec] = [
        TensorSpec("token_embd.weight", (n_embd, n_vocab), weight_type),
        TensorSpec("output_norm.weight", (n_embd,), F32),
        TensorSpec("output.weight", (n_embd, n_vocab), weight_type),
    ]
    for il in range(n_layer):
        blk = f"blk.{il}."
        tensors += [
            TensorSpec(blk + "attn_norm.weight", (n_embd,), F32),
            TensorSpec(blk + "attn_q.weight", (n_embd, n_embd), weight_type),
            TensorSpec(blk + "attn_k.weight", (n_embd, head_dim * n_head_kv), weight_type),
            TensorSpec(blk + "attn_v.weight", (n_embd, head_dim * n_head_kv), weight_type),
            TensorSpec(blk + "attn_output.weight", (n_embd, n_embd), weight_type),
            TensorSpec(blk + "ffn_norm.weight", (n_embd,), F32),
            TensorSpec(blk + "ffn_gate.weight", (n_embd, n_ff), weight_type),
            TensorSpec(blk + "ffn_up.weight", (n_embd, n_ff), weight_type),
            TensorSpec(blk + "ffn_down.weight", (n_ff, n_embd), weight_type),
        ]
    prefix = "llama."
    metadata: dict[str, int | float | str | list[int] | list[str]] = {
        prefix + "block_count": n_layer,
        prefix + "context_length": 131072,
        prefix + "embedding_length": n_embd,
        prefix + "feed_forward_length": n_ff,
        prefix + "attention.head_count": n_head,
        prefix + "attention.head_count_kv": n_head_kv,
        prefix + "rope.dimension_count": head_dim,
        prefix + "attention.layer_norm_rms_epsilon": 1e-5,
    }
    return HeaderModel("llama", f"dense llama {n_layer}x{n_embd}", metadata, tuple(tensors), n_vocab)
