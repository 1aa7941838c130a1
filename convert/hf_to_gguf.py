"""Hugging Face checkpoint (config.json, *.safetensors, tokenizer.json) → GGUF, tensor by tensor.

Supported: Qwen3NextForCausalLM (qwen3next), Qwen3MoeForCausalLM (qwen3moe), Qwen3ForCausalLM (qwen3),
LlamaForCausalLM (llama). Names, shapes and metadata are what llama.cpp's loaders read (src/models/*.cpp).

Memory stays bounded for an 80B checkpoint: the GGUF header (all tensor names, shapes and types) is
written from the safetensors headers alone, then each output tensor is computed from memory-mapped
inputs, written and dropped. The largest thing held at once is one stacked expert tensor (all experts of
one projection of one layer). safetensors files are read directly (8-byte header length, JSON header,
raw little-endian data) with numpy memmaps, so bf16 checkpoints convert without PyTorch.

qwen3next special cases (Gated DeltaNet layers, gated attention, shared expert):
- RMSNorm weights are stored as offsets from 1 (`x * (1 + w)`), so every `*norm.weight` gets +1, except
  the gated norm inside the linear attention (`linear_attn.norm`), which multiplies by `w` directly.
- `A_log` becomes `ssm_a = -exp(A_log)` (llama.cpp multiplies softplus(alpha + dt_bias) by it).
- `in_proj_qkvz` interleaves [q, k, v, z] per key-head group; llama.cpp wants all q, all k, all v in one
  `attn_qkv` and all z in `attn_gate`. `in_proj_ba` keeps its per-group [b, a] layout (llama.cpp splits it).
- `conv1d.weight` [channels, 1, kernel] loses its middle axis.
- `shared_expert_gate` [1, n_embd] becomes the vector `ffn_gate_inp_shexp`.
- Multi-token-prediction weights (`mtp.*`, the draft head Qwen3-Next ships) are kept, the way the bound
  llama.cpp loads them (its convert_hf_to_gguf.py `_QwenMtpMixin`, src/models/qwen3next.cpp; docs/mtp.md):
  the MTP layer `mtp.layers.i.*` becomes block `blk.{num_hidden_layers + i}` with the trunk's names and
  transforms, `mtp.fc` → `nextn.eh_proj`, `mtp.pre_fc_norm_embedding` → `nextn.enorm`,
  `mtp.pre_fc_norm_hidden` → `nextn.hnorm`, `mtp.norm` → `nextn.shared_head_norm` (norms +1 as above);
  block_count counts the MTP blocks and `qwen3next.nextn_predict_layers` says how many there are.
  `mtp=False` (`--no-mtp`) leaves them out (a smaller file that cannot draft with `--spec-type mtp`).
Routed experts (per-expert tensors, or the fused `experts.gate_up_proj`/`experts.down_proj` of newer
transformers) are stacked into one [n_expert, rows, cols] tensor per projection and layer.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt

from convert.tokenizer import TokenizerError, add_tokenizer

F32Array = npt.NDArray[np.float32]

HF_ARCHITECTURES: Mapping[str, str] = {
    "Qwen3NextForCausalLM": "qwen3next",
    "Qwen3MoeForCausalLM": "qwen3moe",
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
}
OUT_TYPES: Mapping[str, gguf.GGMLQuantizationType] = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
}
_FILE_TYPES: Mapping[str, gguf.LlamaFileType] = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
}
# Kept in f32 whatever the output type, as llama.cpp's converter does: vectors, the MoE router (its
# near-ties decide which experts run) and the short convolution kernel.
_ALWAYS_F32_SUFFIXES = ("ffn_gate_inp.weight", "ssm_conv1d.weight")

_SAFETENSORS_DTYPES: Mapping[str, str] = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}


class ConversionError(ValueError):
    """The checkpoint cannot be converted; the message names the file, field or tensor."""


# ---------------------------------------------------------------- reading safetensors


@dataclass(frozen=True)
class StoredTensor:
    """Where one checkpoint tensor's bytes are."""

    file: Path
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    n_bytes: int


def read_safetensors_header(path: Path) -> dict[str, StoredTensor]:
    try:
        with path.open("rb") as source:
            header_len = int.from_bytes(source.read(8), "little")
            header: Any = json.loads(source.read(header_len))
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot read safetensors header of {path}: {exc}") from exc
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: safetensors header is not a JSON object")
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        tensors[name] = StoredTensor(
            file=path,
            dtype=entry["dtype"],
            shape=tuple(int(n) for n in entry["shape"]),
            offset=8 + header_len + int(begin),
            n_bytes=int(end) - int(begin),
        )
    return tensors


def index_checkpoint(hf_dir: Path) -> dict[str, StoredTensor]:
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{hf_dir} has no *.safetensors files (PyTorch .bin checkpoints are not supported)")
    tensors: dict[str, StoredTensor] = {}
    for path in files:
        for name, stored in read_safetensors_header(path).items():
            if name in tensors:
                raise ConversionError(f"tensor {name} is in both {tensors[name].file.name} and {path.name}")
            tensors[name] = stored
    return tensors


def load_f32(stored: StoredTensor) -> F32Array:
    """One tensor as float32, read through a memory map (only its own bytes are touched)."""
    numpy_dtype = _SAFETENSORS_DTYPES.get(stored.dtype)
    if numpy_dtype is None:
        raise ConversionError(f"{stored.file.name}: tensor dtype {stored.dtype} is not supported")
    count = int(np.prod(stored.shape, dtype=np.int64))
    raw = np.memmap(stored.file, dtype=numpy_dtype, mode="r", offset=stored.offset, shape=(count,))
    if stored.dtype == "BF16":
        # bf16 is the top half of an f32: widen the bits, no rounding involved.
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(stored.shape)
    return raw.astype(np.float32).reshape(stored.shape)


# ---------------------------------------------------------------- planning the output


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor: its name, numpy-order shape, and how to compute its f32 values."""

    name: str
    shape: tuple[int, ...]
    produce: Callable[[], F32Array] = field(compare=False, repr=False)
    order: tuple[int, str] = (-1, "")  # writing order: (layer, name); token_embd first, output last


@dataclass(frozen=True)
class ConversionSummary:
    architecture: str
    n_tensors: int
    n_bytes: int  # tensor data bytes written
    n_vocab: int
    tokenizer_pre: str
    skipped: tuple[str, ...]  # checkpoint tensors deliberately left out (e.g. mtp.* with mtp=False)
    n_mtp_layers: int = 0  # multi-token-prediction blocks written after the trunk (nextn_predict_layers)


@dataclass(frozen=True)
class ModelConfig:
    """config.json, with the few lookups that differ between transformers versions."""

    raw: Mapping[str, Any]

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    def need(self, key: str) -> Any:
        if key not in self.raw or self.raw[key] is None:
            raise ConversionError(f"config.json lacks {key!r}")
        return self.raw[key]

    @property
    def rope(self) -> Mapping[str, Any]:
        """rope_parameters (transformers ≥ 5) merged over the older top-level rope_theta / rope_scaling."""
        merged: dict[str, Any] = {}
        if self.raw.get("rope_theta") is not None:
            merged["rope_theta"] = self.raw["rope_theta"]
        if self.raw.get("partial_rotary_factor") is not None:
            merged["partial_rotary_factor"] = self.raw["partial_rotary_factor"]
        if isinstance(self.raw.get("rope_scaling"), Mapping):
            merged.update(self.raw["rope_scaling"])
        if isinstance(self.raw.get("rope_parameters"), Mapping):
            merged.update(self.raw["rope_parameters"])
        return merged

    @property
    def n_experts(self) -> int:
        """Routed experts per layer: `num_experts` in Qwen's configs, `num_local_experts` in newer transformers."""
        value = self.raw.get("num_experts") or self.raw.get("num_local_experts")
        if not value:
            raise ConversionError("config.json lacks 'num_experts' (or 'num_local_experts')")
        return int(value)

    @property
    def head_dim(self) -> int:
        return int(self.get("head_dim") or self.need("hidden_size") // self.need("num_attention_heads"))


def read_config(hf_dir: Path) -> ModelConfig:
    path = hf_dir / "config.json"
    try:
        raw: Any = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path} is missing; is {hf_dir} a Hugging Face checkpoint directory?") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConversionError(f"cannot read {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConversionError(f"{path} is not a JSON object")
    return ModelConfig(raw)


def architecture_of(config: ModelConfig) -> str:
    names = config.get("architectures") or []
    for hf_name in names:
        if hf_name in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[hf_name]
    known = ", ".join(HF_ARCHITECTURES)
    raise ConversionError(f"config.json architectures {names} are not supported (supported: {known})")


# HF name (after "model.layers.N.") → GGUF name (after "blk.N."), per architecture.
_ATTENTION = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
}
_QK_NORM = {"self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}
_DENSE_FFN = {
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_ROUTER = {"mlp.gate.weight": "ffn_gate_inp.weight"}
_LAYER_NAMES: Mapping[str, Mapping[str, str]] = {
    "llama": {**_ATTENTION, **_DENSE_FFN},
    "qwen3": {**_ATTENTION, **_QK_NORM, **_DENSE_FFN},
    "qwen3moe": {**_ATTENTION, **_QK_NORM, "post_attention_layernorm.weight": "ffn_norm.weight", **_ROUTER},
    "qwen3next": {
        **_ATTENTION,
        **_QK_NORM,
        "post_attention_layernorm.weight": "post_attention_norm.weight",
        **_ROUTER,
        "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
        "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
        "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
        "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
        "linear_attn.in_proj_ba.weight": "ssm_ba.weight",
        "linear_attn.conv1d.weight": "ssm_conv1d.weight",
        "linear_attn.A_log": "ssm_a",
        "linear_attn.dt_bias": "ssm_dt.bias",
        "linear_attn.norm.weight": "ssm_norm.weight",
        "linear_attn.out_proj.weight": "ssm_out.weight",
    },
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_FUSED_EXPERTS = re.compile(r"^mlp\.experts\.(gate_up_proj|down_proj)(?:\.weight)?$")
_SKIPPED = re.compile(r"rotary_emb\.inv_freq$")
_MTP = re.compile(r"^(?:model\.)?mtp\.(.+)$")
_MTP_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
# The MTP head's own projections (after "mtp.") → GGUF name after "blk.{first MTP block}.".
_MTP_NAMES: Mapping[str, str] = {
    "fc.weight": "nextn.eh_proj.weight",
    "pre_fc_norm_embedding.weight": "nextn.enorm.weight",
    "pre_fc_norm_hidden.weight": "nextn.hnorm.weight",
    "norm.weight": "nextn.shared_head_norm.weight",
}


def count_mtp_layers(arch: str, stored: Mapping[str, StoredTensor]) -> int:
    """MTP layers in the checkpoint (`mtp.layers.N.*`); only qwen3next's are converted (0 for the others)."""
    if arch != "qwen3next":
        return 0
    mtp_names = [name for name in stored if _MTP.match(name)]
    if not mtp_names:
        return 0
    indices = {int(m[1]) for name in mtp_names if (m := _MTP_LAYER.match(_mtp_rest(name) or ""))}
    if not indices:
        raise ConversionError(
            f"the checkpoint's MTP head is incomplete (no mtp.layers.0.*, only {', '.join(sorted(mtp_names)[:3])}); "
            "convert with --no-mtp to leave it out"
        )
    if indices != {0}:
        # llama.cpp's qwen3next MTP graph runs exactly one block (GGML_ASSERT n_layer_nextn == 1).
        raise ConversionError(f"the checkpoint has MTP layers {sorted(indices)}; llama.cpp's qwen3next runs one")
    missing = [f"mtp.{name}" for name in _MTP_NAMES if not any(_mtp_rest(n) == name for n in stored)]
    if missing:
        raise ConversionError(f"the checkpoint's MTP head lacks {', '.join(missing)}; --no-mtp leaves it out")
    return 1


def _mtp_rest(hf_name: str) -> str | None:
    match = _MTP.match(hf_name)
    return match[1] if match else None


def _mtp_renamed(hf_name: str, n_layers: int) -> str:
    """An MTP tensor's name as the trunk's converter reads it: its layer as `model.layers.{n_layers + i}`,
    its own projections as `model.layers.{n_layers}.nextn.*` (mapped below)."""
    rest = _mtp_rest(hf_name) or ""
    if layer := _MTP_LAYER.match(rest):
        return f"model.layers.{n_layers + int(layer[1])}.{layer[2]}"
    return f"model.layers.{n_layers}.{_MTP_NAMES.get(rest, 'mtp.' + rest)}"


def plan_tensors(
    arch: str, config: ModelConfig, stored: Mapping[str, StoredTensor], *, mtp: bool = True
) -> tuple[list[PlannedTensor], list[str]]:
    """Every GGUF tensor to write (in order) and the checkpoint tensors deliberately skipped.

    mtp: keep qwen3next's multi-token-prediction head (other architectures have none to keep)."""
    planned: list[PlannedTensor] = []
    skipped: list[str] = []
    experts: dict[tuple[int, str], dict[int, StoredTensor]] = {}
    unmapped: list[str] = []
    layer_names = {**_LAYER_NAMES[arch], **({name: name for name in _MTP_NAMES.values()} if mtp else {})}
    n_layers = int(config.need("num_hidden_layers"))
    for stored_name, tensor in stored.items():
        is_mtp = _MTP.match(stored_name) is not None
        if _SKIPPED.search(stored_name) or (is_mtp and not (mtp and arch == "qwen3next")):
            skipped.append(stored_name)
            continue
        # Transforms (norm +1, ...) look at the name the tensor has in the trunk's terms.
        hf_name = _mtp_renamed(stored_name, n_layers) if is_mtp else stored_name
        if hf_name in _GLOBAL_NAMES:
            planned.append(_simple(arch, config, tensor, _GLOBAL_NAMES[hf_name], hf_name, layer=None))
            continue
        layer_match = _LAYER.match(hf_name)
        if layer_match is None:
            unmapped.append(stored_name)
            continue
        layer, rest = int(layer_match[1]), layer_match[2]
        if rest in layer_names:
            planned.append(_simple(arch, config, tensor, f"blk.{layer}.{layer_names[rest]}", hf_name, layer))
        elif (expert := _EXPERT.match(rest)) and arch in ("qwen3moe", "qwen3next"):
            experts.setdefault((layer, expert[2]), {})[int(expert[1])] = tensor
        elif (fused := _FUSED_EXPERTS.match(rest)) and arch in ("qwen3moe", "qwen3next"):
            planned.extend(_fused_experts(layer, fused[1], tensor))
        elif arch == "qwen3next" and rest == "linear_attn.in_proj_qkvz.weight":
            planned.extend(_split_qkvz(config, layer, tensor))
        else:
            unmapped.append(stored_name)
    if unmapped:
        shown = ", ".join(sorted(unmapped)[:5]) + (" ..." if len(unmapped) > 5 else "")
        raise ConversionError(f"no {arch} GGUF tensor for {len(unmapped)} checkpoint tensor(s): {shown}")
    planned.extend(_stacked_experts(config, experts))
    planned.sort(key=lambda t: t.order)
    return planned, sorted(skipped)


def _order(layer: int | None, gguf_name: str) -> tuple[int, str]:
    if layer is not None:
        return (layer, gguf_name)
    return (-1, gguf_name) if gguf_name.startswith("token_embd") else (1 << 30, gguf_name)


def _simple(
    arch: str, config: ModelConfig, tensor: StoredTensor, gguf_name: str, hf_name: str, layer: int | None
) -> PlannedTensor:
    transform = _transform_for(arch, config, hf_name, gguf_name)
    shape = tensor.shape
    if gguf_name.endswith("ssm_conv1d.weight"):
        shape = (shape[0], shape[-1])
    elif gguf_name.endswith("ffn_gate_inp_shexp.weight"):
        shape = (int(np.prod(shape)),)

    def produce() -> F32Array:
        return transform(load_f32(tensor)).reshape(shape)

    return PlannedTensor(name=gguf_name, shape=shape, produce=produce, order=_order(layer, gguf_name))


def _transform_for(arch: str, config: ModelConfig, hf_name: str, gguf_name: str) -> Callable[[F32Array], F32Array]:
    if arch == "qwen3next":
        if hf_name.endswith(".A_log"):
            return lambda a: (-np.exp(a)).astype(np.float32)
        if hf_name.endswith("norm.weight") and not hf_name.endswith("linear_attn.norm.weight"):
            return lambda w: w + np.float32(1.0)
    if arch == "llama" and hf_name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
        n_heads = int(config.need("num_attention_heads"))
        if hf_name.endswith("k_proj.weight"):
            n_heads = int(config.get("num_key_value_heads") or n_heads)
        return lambda w: _rope_interleave(w, n_heads)
    return _identity


def _identity(values: F32Array) -> F32Array:
    return values


def _rope_interleave(weight: F32Array, n_heads: int) -> F32Array:
    """HF llama rotates halves of each head (x[:d/2], x[d/2:]); llama.cpp's llama rope rotates pairs
    (x[2i], x[2i+1]). Reordering each head's output rows makes the two computations identical."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _split_qkvz(config: ModelConfig, layer: int, tensor: StoredTensor) -> list[PlannedTensor]:
    head_k = int(config.need("linear_key_head_dim"))
    head_v = int(config.need("linear_value_head_dim"))
    n_k_heads = int(config.need("linear_num_key_heads"))
    n_v_heads = int(config.need("linear_num_value_heads"))
    v_per_group = n_v_heads // n_k_heads * head_v
    group = 2 * head_k + 2 * v_per_group
    n_embd = tensor.shape[1]
    if tensor.shape[0] != n_k_heads * group:
        raise ConversionError(
            f"model.layers.{layer}.linear_attn.in_proj_qkvz.weight has {tensor.shape[0]} rows, "
            f"config.json implies {n_k_heads * group}"
        )

    def parts() -> tuple[F32Array, F32Array]:
        grouped = load_f32(tensor).reshape(n_k_heads, group, n_embd)
        q = grouped[:, :head_k].reshape(-1, n_embd)
        k = grouped[:, head_k : 2 * head_k].reshape(-1, n_embd)
        v = grouped[:, 2 * head_k : 2 * head_k + v_per_group].reshape(-1, n_embd)
        z = grouped[:, 2 * head_k + v_per_group :].reshape(-1, n_embd)
        return np.concatenate([q, k, v]), np.ascontiguousarray(z)

    qkv_rows = 2 * n_k_heads * head_k + n_v_heads * head_v
    return [
        PlannedTensor(
            f"blk.{layer}.attn_qkv.weight",
            (qkv_rows, n_embd),
            lambda: parts()[0],
            _order(layer, f"blk.{layer}.attn_qkv.weight"),
        ),
        PlannedTensor(
            f"blk.{layer}.attn_gate.weight",
            (n_v_heads * head_v, n_embd),
            lambda: parts()[1],
            _order(layer, f"blk.{layer}.attn_gate.weight"),
        ),
    ]


def _stacked_experts(
    config: ModelConfig, experts: Mapping[tuple[int, str], Mapping[int, StoredTensor]]
) -> Iterator[PlannedTensor]:
    n_expert = config.n_experts if experts else 0
    for (layer, projection), by_index in sorted(experts.items()):
        if sorted(by_index) != list(range(n_expert)):
            missing = sorted(set(range(n_expert)) - set(by_index))
            raise ConversionError(f"layer {layer} {projection}_proj lacks experts {missing[:8]} of {n_expert}")
        parts = [by_index[i] for i in range(n_expert)]
        name = f"blk.{layer}.ffn_{projection}_exps.weight"
        if odd := [i for i, part in enumerate(parts) if part.shape != parts[0].shape]:
            raise ConversionError(f"layer {layer} {projection}_proj: experts {odd[:8]} differ in shape from expert 0")

        def produce(parts: Sequence[StoredTensor] = parts) -> F32Array:
            # filled in place: peak memory is the stacked tensor plus one expert, not twice the stack
            stacked = np.empty((len(parts), *parts[0].shape), dtype=np.float32)
            for index, part in enumerate(parts):
                stacked[index] = load_f32(part)
            return stacked

        yield PlannedTensor(name, (n_expert, *parts[0].shape), produce, _order(layer, name))


def _fused_experts(layer: int, kind: str, tensor: StoredTensor) -> list[PlannedTensor]:
    if kind == "down_proj":
        name = f"blk.{layer}.ffn_down_exps.weight"
        return [PlannedTensor(name, tensor.shape, lambda: load_f32(tensor), _order(layer, name))]
    n_expert, two_ff, n_embd = tensor.shape
    n_ff = two_ff // 2
    gate, up = f"blk.{layer}.ffn_gate_exps.weight", f"blk.{layer}.ffn_up_exps.weight"
    return [
        PlannedTensor(gate, (n_expert, n_ff, n_embd), lambda: load_f32(tensor)[:, :n_ff], _order(layer, gate)),
        PlannedTensor(up, (n_expert, n_ff, n_embd), lambda: load_f32(tensor)[:, n_ff:], _order(layer, up)),
    ]


# ---------------------------------------------------------------- metadata


def add_metadata(
    writer: gguf.GGUFWriter, arch: str, config: ModelConfig, name: str, out_type: str, n_mtp_layers: int = 0
) -> None:
    n_layers = int(config.need("num_hidden_layers"))
    writer.add_name(name)
    writer.add_block_count(n_layers + n_mtp_layers)  # llama.cpp's trunk is block_count - nextn_predict_layers
    if n_mtp_layers:
        writer.add_nextn_predict_layers(n_mtp_layers)
    writer.add_context_length(int(config.need("max_position_embeddings")))
    writer.add_embedding_length(int(config.need("hidden_size")))
    writer.add_head_count(int(config.need("num_attention_heads")))
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or config.need("num_attention_heads")))
    writer.add_layer_norm_rms_eps(float(config.need("rms_norm_eps")))
    writer.add_vocab_size(int(config.need("vocab_size")))
    writer.add_file_type(_FILE_TYPES[out_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if config.get("head_dim") is not None:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    _add_rope(writer, arch, config)
    if arch in ("qwen3", "llama", "qwen3next"):
        writer.add_feed_forward_length(int(config.need("intermediate_size")))
    if arch in ("qwen3moe", "qwen3next"):
        _add_moe(writer, arch, config, n_layers)
    if arch == "qwen3next":
        _add_gated_deltanet(writer, config, n_layers, n_mtp_layers)


def _add_rope(writer: gguf.GGUFWriter, arch: str, config: ModelConfig) -> None:
    rope = config.rope
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif rope_type != "default":
        raise ConversionError(f"rope type {rope_type!r} in config.json is not supported (default, linear, yarn)")
    if arch == "qwen3next":
        writer.add_rope_dimension_count(int(config.head_dim * float(rope.get("partial_rotary_factor", 0.25))))
    elif arch == "llama":
        writer.add_rope_dimension_count(config.head_dim)


def _add_moe(writer: gguf.GGUFWriter, arch: str, config: ModelConfig, n_layers: int) -> None:
    # llama.cpp always renormalizes the chosen experts' weights and puts an MoE block in every layer.
    if config.get("norm_topk_prob") is False:
        raise ConversionError("norm_topk_prob=false is not supported: llama.cpp renormalizes the top-k weights")
    if config.get("mlp_only_layers") or int(config.get("decoder_sparse_step") or 1) != 1:
        raise ConversionError("dense layers inside an MoE model (mlp_only_layers/decoder_sparse_step) are unsupported")
    writer.add_expert_count(config.n_experts)
    writer.add_expert_used_count(int(config.need("num_experts_per_tok")))
    writer.add_expert_feed_forward_length(int(config.need("moe_intermediate_size")))
    if arch == "qwen3next":
        writer.add_expert_shared_feed_forward_length(int(config.need("shared_expert_intermediate_size")))


def _add_gated_deltanet(writer: gguf.GGUFWriter, config: ModelConfig, n_layers: int, n_mtp_layers: int) -> None:
    head_k = int(config.need("linear_key_head_dim"))
    head_v = int(config.need("linear_value_head_dim"))
    if head_k != head_v:
        raise ConversionError(f"linear_key_head_dim {head_k} != linear_value_head_dim {head_v}: llama.cpp needs equal")
    n_k_heads = int(config.need("linear_num_key_heads"))
    n_v_heads = int(config.need("linear_num_value_heads"))
    if n_v_heads % n_k_heads:
        raise ConversionError(f"linear_num_value_heads {n_v_heads} is not a multiple of linear_num_key_heads")
    writer.add_ssm_conv_kernel(int(config.need("linear_conv_kernel_dim")))
    writer.add_ssm_state_size(head_k)
    writer.add_ssm_group_count(n_k_heads)
    writer.add_ssm_time_step_rank(n_v_heads)
    writer.add_ssm_inner_size(head_v * n_v_heads)
    interval = int(config.get("full_attention_interval") or 4)
    layer_types = config.get("layer_types")
    by_interval = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(n_layers)]
    if layer_types is None or list(layer_types) == by_interval:
        writer.add_full_attention_interval(interval)
    else:
        if len(layer_types) != n_layers:
            raise ConversionError(f"layer_types has {len(layer_types)} entries for {n_layers} layers")
        # One entry per block: the MTP blocks are full attention.
        recurrent = [kind == "linear_attention" for kind in layer_types] + [False] * n_mtp_layers
        writer.add_array(f"{writer.arch}.attention.recurrent_layers", recurrent)


# ---------------------------------------------------------------- writing


def _stored_type(planned: PlannedTensor, out_type: str) -> gguf.GGMLQuantizationType:
    if len(planned.shape) <= 1 or planned.name.endswith(_ALWAYS_F32_SUFFIXES):
        return gguf.GGMLQuantizationType.F32
    return OUT_TYPES[out_type]


def _encode(values: F32Array, ggml_type: gguf.GGMLQuantizationType) -> npt.NDArray[Any]:
    if ggml_type == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if ggml_type == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(values, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), ggml_type)


def _declare(writer: gguf.GGUFWriter, planned: PlannedTensor, ggml_type: gguf.GGMLQuantizationType) -> int:
    n_values = int(np.prod(planned.shape, dtype=np.int64))
    if ggml_type == gguf.GGMLQuantizationType.BF16:
        byte_shape = (*planned.shape[:-1], planned.shape[-1] * 2)
        writer.add_tensor_info(planned.name, byte_shape, np.dtype(np.uint8), n_values * 2, raw_dtype=ggml_type)
        return n_values * 2
    dtype = np.dtype(np.float32 if ggml_type == gguf.GGMLQuantizationType.F32 else np.float16)
    writer.add_tensor_info(planned.name, planned.shape, dtype, n_values * dtype.itemsize)
    return n_values * dtype.itemsize


def convert_checkpoint(hf_dir: Path, out: Path, *, out_type: str = "bf16", mtp: bool = True) -> ConversionSummary:
    """Convert the checkpoint in `hf_dir` to `out` (written under a temporary name, renamed when complete).

    mtp: keep Qwen3-Next's multi-token-prediction head (False: leave it out, like llama.cpp's --no-mtp)."""
    from tqdm.auto import tqdm

    hf_dir, out = Path(hf_dir), Path(out)
    if out_type not in OUT_TYPES:
        raise ConversionError(f"output type {out_type!r} is not one of {', '.join(OUT_TYPES)}")
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir} is not a directory")
    config = read_config(hf_dir)
    arch = architecture_of(config)
    stored = index_checkpoint(hf_dir)
    n_mtp_layers = count_mtp_layers(arch, stored) if mtp else 0
    planned, skipped = plan_tensors(arch, config, stored, mtp=mtp)
    n_vocab = int(config.need("vocab_size"))
    writer = gguf.GGUFWriter(path=None, arch=arch)
    add_metadata(writer, arch, config, hf_dir.resolve().name, out_type, n_mtp_layers)
    try:
        vocab = add_tokenizer(writer, hf_dir, n_vocab)
    except TokenizerError as exc:
        raise ConversionError(str(exc)) from exc
    types = [_stored_type(p, out_type) for p in planned]
    n_bytes = sum(_declare(writer, p, t) for p, t in zip(planned, types, strict=True))

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p, ggml_type in tqdm(
            list(zip(planned, types, strict=True)), desc="tensors", unit="t", leave=False, disable=None
        ):
            values = p.produce()
            if values.shape != p.shape:
                raise ConversionError(f"{p.name}: computed shape {values.shape}, planned {p.shape}")
            writer.write_tensor_data(_encode(values, ggml_type))
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return ConversionSummary(
        architecture=arch,
        n_tensors=len(planned),
        n_bytes=n_bytes,
        n_vocab=n_vocab,
        tokenizer_pre=vocab.pre,
        skipped=tuple(skipped),
        n_mtp_layers=n_mtp_layers,
    )
