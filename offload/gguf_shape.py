"""The shape of a model, read from its GGUF header alone: tensors per layer and kind, KV and recurrent sizes.

Only the header is read (key/value metadata and tensor descriptors); tensor data is never touched, so a 45 GiB
file is inventoried in well under a second. Split GGUFs (`*-00001-of-00003.gguf`) are followed shard by shard.

Sizes follow llama.cpp's own rules (llama.cpp 0c1e57098, vendored in llama-cpp-python 0.3.36):
- KV cache: one K and one V row per full-attention layer and cell (src/llama-kv-cache.cpp, llama_kv_cache ctor:
  `ggml_new_tensor_3d(ctx, type_k, n_embd_k_gqa, kv_size, n_stream)`); recurrent layers of hybrid models have none.
- Recurrent state: per recurrent layer one conv row (`n_embd_r`) and one SSM row (`n_embd_s`), both f32, per
  sequence (src/llama-hparams.cpp n_embd_r/n_embd_s; src/llama-memory-recurrent.cpp allocates
  `mem_size * (1 + n_rs_seq)` rows with mem_size = max(1, n_seq_max)).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
HEADER_READ_CHUNK = 4 * 1024 * 1024

# Architectures whose recurrent layers are every layer except each `full_attention_interval`-th one
# (src/models/qwen3next.cpp load_arch_hparams; qwen35/qwen35moe use the same rule).
INTERVAL_HYBRID_ARCHS = frozenset({"qwen3next", "qwen35", "qwen35moe"})
# Architectures made only of recurrent layers (no KV cache at all).
PURE_RECURRENT_ARCHS = frozenset({"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"})


class GgufError(ValueError):
    """The file is not a GGUF this module can read; the message says what is wrong."""


class TensorKind(StrEnum):
    """What a tensor is for, which decides where the planner may put it."""

    EMBEDDING = "embedding"  # token_embd: llama.cpp always keeps it on the CPU
    OUTPUT = "output"  # output.weight and output_norm: the output "layer"
    ATTENTION = "attention"  # full-attention projections of a layer
    SSM = "ssm"  # linear attention / state-space projections of a recurrent layer
    NORM = "norm"  # per-layer norm weights
    DENSE_FFN = "dense_ffn"
    ROUTER = "router"  # ffn_gate_inp: picks the experts
    SHARED_EXPERT = "shared_expert"
    ROUTED_EXPERTS = "routed_experts"  # ffn_*_exps: what `-ot` / `--n-cpu-moe` move to the CPU
    OTHER = "other"


class KvType(StrEnum):
    """KV cache element types the planner may choose (llama.cpp's `--cache-type-k/-v`)."""

    F16 = "f16"
    Q8_0 = "q8_0"
    Q4_0 = "q4_0"

    @property
    def ggml_type(self) -> GGMLQuantizationType:
        return {
            KvType.F16: GGMLQuantizationType.F16,
            KvType.Q8_0: GGMLQuantizationType.Q8_0,
            KvType.Q4_0: GGMLQuantizationType.Q4_0,
        }[self]


def row_bytes(ggml_type: int, n_elements: int) -> int:
    """Bytes of `n_elements` consecutive values of a ggml type (ggml_row_size)."""
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    if n_elements % block_size:
        raise GgufError(f"{n_elements} elements are not a whole number of {block_size}-element blocks")
    return n_elements // block_size * type_size


@dataclass(frozen=True)
class TensorInfo:
    """One tensor descriptor from the header. `shape` is in ggml order (ne0 first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    n_bytes: int
    file_index: int  # which shard holds it (0 for single-file models)
    offset: int  # absolute byte offset of its data in that shard
    layer: int | None
    kind: TensorKind

    @property
    def type_name(self) -> str:
        return GGMLQuantizationType(self.ggml_type).name


@dataclass(frozen=True)
class LayerShape:
    """One repeating block: its kind and its bytes per tensor kind."""

    index: int
    is_recurrent: bool
    has_kv: bool
    n_embd_k_gqa: int
    n_embd_v_gqa: int
    bytes_by_kind: tuple[tuple[TensorKind, int], ...]

    def bytes_of(self, *kinds: TensorKind) -> int:
        return sum(n_bytes for kind, n_bytes in self.bytes_by_kind if kind in kinds)

    @property
    def total_bytes(self) -> int:
        return sum(n_bytes for _, n_bytes in self.bytes_by_kind)

    @property
    def expert_bytes(self) -> int:
        return self.bytes_of(TensorKind.ROUTED_EXPERTS)

    @property
    def non_expert_bytes(self) -> int:
        return self.total_bytes - self.expert_bytes

    @property
    def mixer_kind(self) -> str:
        return "ssm" if self.is_recurrent else "attention"


@dataclass(frozen=True)
class SsmShape:
    """Hyper-parameters of the recurrent (Mamba / Gated DeltaNet style) layers."""

    d_conv: int
    d_inner: int
    d_state: int
    n_group: int
    dt_rank: int

    @property
    def n_embd_r(self) -> int:
        # conv state: the last d_conv-1 inputs of every conv channel (llama_hparams::n_embd_r)
        return max(self.d_conv - 1, 0) * (self.d_inner + 2 * self.n_group * self.d_state)

    @property
    def n_embd_s(self) -> int:
        # delta / SSM state (llama_hparams::n_embd_s)
        return self.d_state * self.d_inner


@dataclass(frozen=True)
class ModelShape:
    """Everything the planner needs to know about a model, from the header only."""

    path: Path
    file_sizes: tuple[int, ...]
    architecture: str
    name: str
    n_layer: int
    n_embd: int
    n_vocab: int
    n_head: int
    n_ctx_train: int
    n_ff: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_ff_shexp: int
    head_dim_k: int
    head_dim_v: int
    ssm: SsmShape | None
    alignment: int
    layers: tuple[LayerShape, ...]
    tensors: tuple[TensorInfo, ...] = field(repr=False)

    @property
    def total_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def expert_bytes(self) -> int:
        return sum(layer.expert_bytes for layer in self.layers)

    @property
    def non_expert_bytes(self) -> int:
        return self.total_bytes - self.expert_bytes

    def bytes_of(self, *kinds: TensorKind) -> int:
        return sum(t.n_bytes for t in self.tensors if t.kind in kinds)

    @property
    def embedding_bytes(self) -> int:
        return self.bytes_of(TensorKind.EMBEDDING)

    @property
    def output_bytes(self) -> int:
        return self.bytes_of(TensorKind.OUTPUT)

    @property
    def is_moe(self) -> bool:
        return self.expert_bytes > 0

    @property
    def has_recurrent_layers(self) -> bool:
        return any(layer.is_recurrent for layer in self.layers)

    @property
    def n_attention_layers(self) -> int:
        return sum(layer.has_kv for layer in self.layers)

    def kv_bytes_per_token(self, kv_type: KvType) -> int:
        """K + V bytes one cached token costs, summed over the layers that have a KV cache."""
        return sum(self.kv_bytes_per_token_of_layer(layer, kv_type) for layer in self.layers)

    @staticmethod
    def kv_bytes_per_token_of_layer(layer: LayerShape, kv_type: KvType) -> int:
        if not layer.has_kv:
            return 0
        return row_bytes(kv_type.ggml_type, layer.n_embd_k_gqa) + row_bytes(kv_type.ggml_type, layer.n_embd_v_gqa)

    def recurrent_bytes_per_sequence_of_layer(self, layer: LayerShape) -> int:
        if not layer.is_recurrent or self.ssm is None:
            return 0
        return (self.ssm.n_embd_r + self.ssm.n_embd_s) * 4  # r and s are f32 (llama-model.cpp create_memory)

    @property
    def recurrent_bytes_per_sequence(self) -> int:
        """Conv + SSM state of one sequence, all recurrent layers (independent of the context length)."""
        return sum(self.recurrent_bytes_per_sequence_of_layer(layer) for layer in self.layers)

    def layer_tensors(self, index: int) -> tuple[TensorInfo, ...]:
        return tuple(t for t in self.tensors if t.layer == index)


# ---------------------------------------------------------------------------------------------------------
# Header parsing


_SCALAR_FORMATS: dict[int, str] = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING = 8
_ARRAY = 9


@dataclass(frozen=True)
class ArrayInfo:
    """An array-valued key: only its element type and length are kept (token lists are never decoded)."""

    element_type: int
    length: int
    values: tuple[int | float | bool | str, ...] | None  # kept only for short numeric arrays


MetaValue = int | float | bool | str | ArrayInfo


class _HeaderReader:
    """Sequential little-endian reader over the start of a file, reading more only when needed."""

    def __init__(self, stream: BinaryIO, path: Path) -> None:
        self._stream = stream
        self._path = path
        self._buffer = b""
        self._position = 0

    @property
    def position(self) -> int:
        return self._position

    def _need(self, n_bytes: int) -> None:
        missing = self._position + n_bytes - len(self._buffer)
        if missing > 0:
            chunk = self._stream.read(max(missing, HEADER_READ_CHUNK))
            self._buffer += chunk
            if self._position + n_bytes > len(self._buffer):
                raise GgufError(f"{self._path}: header is truncated")

    def unpack(self, fmt: str) -> tuple[int | float | bool, ...]:
        size = struct.calcsize("<" + fmt)
        self._need(size)
        values = struct.unpack_from("<" + fmt, self._buffer, self._position)
        self._position += size
        return values

    def raw(self, n_bytes: int) -> bytes:
        self._need(n_bytes)
        data = bytes(self._buffer[self._position : self._position + n_bytes])
        self._position += n_bytes
        return data

    def u32(self) -> int:
        return int(self.unpack("I")[0])

    def u64(self) -> int:
        return int(self.unpack("Q")[0])

    def string(self) -> str:
        length = self.u64()
        if length > 1 << 30:
            raise GgufError(f"{self._path}: implausible string length {length} in header")
        self._need(length)
        raw = self._buffer[self._position : self._position + length]
        self._position += length
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        for _ in range(count):
            length = self.u64()
            self._need(length)
            self._position += length

    def value(self, value_type: int) -> MetaValue:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            return self.array()
        fmt = _SCALAR_FORMATS.get(value_type)
        if fmt is None:
            raise GgufError(f"{self._path}: unknown metadata value type {value_type}")
        return self.unpack(fmt)[0]

    def array(self) -> ArrayInfo:
        element_type = self.u32()
        length = self.u64()
        if element_type == _STRING:
            self.skip_strings(length)
            return ArrayInfo(element_type, length, None)
        fmt = _SCALAR_FORMATS.get(element_type)
        if fmt is None:
            raise GgufError(f"{self._path}: unsupported array element type {element_type}")
        item_size = struct.calcsize("<" + fmt)
        self._need(item_size * length)
        values: tuple[int | float | bool, ...] | None = None
        if length <= 4096:  # per-layer arrays (head counts, recurrent flags); big ones are skipped
            values = struct.unpack_from(f"<{length}{fmt}", self._buffer, self._position)
        self._position += item_size * length
        return ArrayInfo(element_type, length, values)


@dataclass(frozen=True)
class _RawTensor:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    relative_offset: int


@dataclass(frozen=True)
class _Shard:
    path: Path
    file_size: int
    metadata: dict[str, MetaValue]
    tensors: tuple[_RawTensor, ...]
    data_offset: int


def _read_shard(path: Path) -> _Shard:
    try:
        file_size = path.stat().st_size
        with path.open("rb") as stream:
            reader = _HeaderReader(stream, path)
            if reader.raw(4) != GGUF_MAGIC:
                raise GgufError(f"{path}: not a GGUF file (bad magic)")
            version = reader.u32()
            if version not in (2, 3):
                raise GgufError(f"{path}: GGUF version {version} is not supported (2 or 3 expected)")
            n_tensors = reader.u64()
            n_kv = reader.u64()
            metadata: dict[str, MetaValue] = {}
            for _ in range(n_kv):
                key = reader.string()
                metadata[key] = reader.value(reader.u32())
            tensors = []
            for _ in range(n_tensors):
                name = reader.string()
                n_dims = reader.u32()
                shape = tuple(reader.u64() for _ in range(n_dims))
                ggml_type = reader.u32()
                tensors.append(_RawTensor(name, shape, ggml_type, reader.u64()))
            header_end = reader.position
    except OSError as exc:
        raise GgufError(f"cannot read {path}: {exc.strerror or exc}") from exc
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise GgufError(f"{path}: bad general.alignment {alignment!r}")
    data_offset = -(-header_end // alignment) * alignment
    return _Shard(path, file_size, metadata, tuple(tensors), data_offset)


_SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def _shard_paths(first: Path, n_split: int) -> list[Path]:
    """llama.cpp's split naming (llama_split_path): PREFIX-%05d-of-%05d.gguf."""
    match = _SPLIT_NAME.match(first.name)
    if match is None:
        raise GgufError(f"{first}: split.count is {n_split} but the name does not look like PREFIX-00001-of-N.gguf")
    prefix = match.group("prefix")
    return [first.with_name(f"{prefix}-{i:05d}-of-{n_split:05d}.gguf") for i in range(1, n_split + 1)]


# ---------------------------------------------------------------------------------------------------------
# Classification

_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")
_EXPERT_TENSOR = re.compile(r"^ffn_(gate|up|down|gate_up)_(exps|chexps)\b")
_SHARED_EXPERT_TENSOR = re.compile(r"^ffn_\w+_shexp\b")
_DENSE_FFN_TENSOR = re.compile(r"^ffn_(gate|up|down|gate_up)\.")
_NORM_TENSOR = re.compile(r"^(\w+_)?norm\b|_norm\.|^layer_output_norm")
_KV_PRODUCERS = ("attn_k.", "attn_qkv.", "attn_kv_a_mqa.", "attn_k_b.")


def classify_tensor(name: str) -> tuple[int | None, TensorKind]:
    """Layer index and kind of a tensor from its llama.cpp name (the layer decides attention vs ssm later)."""
    match = _LAYER_NAME.match(name)
    if match is None:
        if name.startswith("token_embd"):
            return None, TensorKind.EMBEDDING
        if name.startswith(("output", "result_norm")):
            return None, TensorKind.OUTPUT
        return None, TensorKind.OTHER
    layer, rest = int(match.group(1)), match.group(2)
    if _EXPERT_TENSOR.match(rest):
        return layer, TensorKind.ROUTED_EXPERTS
    if rest.startswith(("ffn_gate_inp.", "exp_probs_b")):
        return layer, TensorKind.ROUTER
    if _SHARED_EXPERT_TENSOR.match(rest):
        return layer, TensorKind.SHARED_EXPERT
    if _NORM_TENSOR.search(rest) and not rest.startswith(("ssm_norm", "attn_q_norm", "attn_k_norm")):
        return layer, TensorKind.NORM
    if _DENSE_FFN_TENSOR.match(rest):
        return layer, TensorKind.DENSE_FFN
    if rest.startswith(("ssm_", "time_mix", "channel_mix", "conv")):
        return layer, TensorKind.SSM
    return layer, TensorKind.ATTENTION


def tensor_bytes(shape: tuple[int, ...], ggml_type: int, name: str = "?") -> int:
    try:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise GgufError(f"tensor {name}: unknown ggml type {ggml_type}") from None
    n_elements = 1
    for dim in shape:
        n_elements *= dim
    if not shape or shape[0] % block_size:
        raise GgufError(f"tensor {name}: first dimension {shape[:1]} is not a multiple of {block_size}")
    return n_elements // block_size * type_size


# ---------------------------------------------------------------------------------------------------------
# Model shape


def _int_key(metadata: dict[str, MetaValue], key: str, default: int | None = None) -> int:
    value = metadata.get(key)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, ArrayInfo) and value.values:
        return int(max(value.values))
    if default is None:
        raise GgufError(f"missing metadata key {key}")
    return default


def _per_layer(metadata: dict[str, MetaValue], key: str, n_layer: int, default: int) -> list[int]:
    value = metadata.get(key)
    if isinstance(value, ArrayInfo) and value.values is not None and len(value.values) >= n_layer:
        return [int(v) for v in value.values[:n_layer]]
    if isinstance(value, int) and not isinstance(value, bool):
        return [value] * n_layer
    return [default] * n_layer


def _recurrent_flags(
    arch: str, metadata: dict[str, MetaValue], n_layer: int, layer_tensors: dict[int, list[TensorInfo]]
) -> list[bool]:
    if arch in PURE_RECURRENT_ARCHS:
        return [True] * n_layer
    explicit = metadata.get(f"{arch}.attention.recurrent_layers")
    if isinstance(explicit, ArrayInfo) and explicit.values is not None and len(explicit.values) >= n_layer:
        return [bool(v) for v in explicit.values[:n_layer]]
    if arch in INTERVAL_HYBRID_ARCHS:
        interval = _int_key(metadata, f"{arch}.full_attention_interval", 4)
        return [(i + 1) % interval != 0 for i in range(n_layer)]
    return [any(t.kind == TensorKind.SSM for t in layer_tensors.get(i, [])) for i in range(n_layer)]


def _ssm_shape(arch: str, metadata: dict[str, MetaValue]) -> SsmShape | None:
    d_inner = _int_key(metadata, f"{arch}.ssm.inner_size", 0)
    if d_inner == 0:
        return None
    return SsmShape(
        d_conv=_int_key(metadata, f"{arch}.ssm.conv_kernel", 0),
        d_inner=d_inner,
        d_state=_int_key(metadata, f"{arch}.ssm.state_size", 0),
        n_group=_int_key(metadata, f"{arch}.ssm.group_count", 0),
        dt_rank=_int_key(metadata, f"{arch}.ssm.time_step_rank", 0),
    )


def read_model_shape(path: Path | str) -> ModelShape:
    """Inventory a GGUF (all shards of a split model) from its headers; raises GgufError on a bad file."""
    first_path = Path(path)
    if not first_path.is_file():
        raise GgufError(f"{first_path}: no such file")
    first = _read_shard(first_path)
    n_split = _int_key(first.metadata, "split.count", 1)
    shards = [first] if n_split <= 1 else [first, *(_read_shard(p) for p in _shard_paths(first_path, n_split)[1:])]

    metadata = first.metadata
    arch_value = metadata.get("general.architecture")
    if not isinstance(arch_value, str):
        raise GgufError(f"{first_path}: general.architecture is missing")
    arch = arch_value

    tensors: list[TensorInfo] = []
    for file_index, shard in enumerate(shards):
        for raw in shard.tensors:
            layer, kind = classify_tensor(raw.name)
            n_bytes = tensor_bytes(raw.shape, raw.ggml_type, raw.name)
            offset = shard.data_offset + raw.relative_offset
            if offset + n_bytes > shard.file_size:
                raise GgufError(f"{shard.path}: tensor {raw.name} ends past the end of the file (truncated download?)")
            tensors.append(TensorInfo(raw.name, raw.shape, raw.ggml_type, n_bytes, file_index, offset, layer, kind))

    try:
        n_layer = _int_key(metadata, f"{arch}.block_count")
        n_embd = _int_key(metadata, f"{arch}.embedding_length")
    except GgufError as exc:
        raise GgufError(f"{first_path}: {exc}") from None
    n_head_per_layer = _per_layer(metadata, f"{arch}.attention.head_count", n_layer, 0)
    n_head = max(n_head_per_layer) if n_head_per_layer else 0
    n_head_kv_per_layer = _per_layer(metadata, f"{arch}.attention.head_count_kv", n_layer, n_head)
    default_head_dim = n_embd // n_head if n_head else 0
    head_dim_k = _int_key(metadata, f"{arch}.attention.key_length", default_head_dim)
    head_dim_v = _int_key(metadata, f"{arch}.attention.value_length", default_head_dim)

    tokens = metadata.get("tokenizer.ggml.tokens")
    n_vocab = _int_key(metadata, f"{arch}.vocab_size", tokens.length if isinstance(tokens, ArrayInfo) else 0)

    by_layer: dict[int, list[TensorInfo]] = {}
    for tensor in tensors:
        if tensor.layer is not None:
            by_layer.setdefault(tensor.layer, []).append(tensor)
    recurrent = _recurrent_flags(arch, metadata, n_layer, by_layer)

    layers = []
    relabelled: dict[str, TensorInfo] = {}
    for index in range(n_layer):
        members = by_layer.get(index, [])
        if recurrent[index]:
            # on a recurrent layer every mixing tensor (attn_qkv, attn_gate, ssm_*) belongs to the linear attention
            for tensor in members:
                if tensor.kind == TensorKind.ATTENTION:
                    relabelled[tensor.name] = replace(tensor, kind=TensorKind.SSM)
            members = [relabelled.get(t.name, t) for t in members]
        has_kv = not recurrent[index] and any(t.name.split(".", 2)[2].startswith(_KV_PRODUCERS) for t in members)
        totals: dict[TensorKind, int] = {}
        for tensor in members:
            totals[tensor.kind] = totals.get(tensor.kind, 0) + tensor.n_bytes
        layers.append(
            LayerShape(
                index=index,
                is_recurrent=recurrent[index],
                has_kv=has_kv,
                n_embd_k_gqa=n_head_kv_per_layer[index] * head_dim_k,
                n_embd_v_gqa=n_head_kv_per_layer[index] * head_dim_v,
                bytes_by_kind=tuple(sorted(totals.items())),
            )
        )
    tensors = [relabelled.get(t.name, t) for t in tensors]

    name_value = metadata.get("general.name")
    return ModelShape(
        path=first_path.resolve(),
        file_sizes=tuple(s.file_size for s in shards),
        architecture=arch,
        name=name_value if isinstance(name_value, str) else first_path.stem,
        n_layer=n_layer,
        n_embd=n_embd,
        n_vocab=n_vocab,
        n_head=n_head,
        n_ctx_train=_int_key(metadata, f"{arch}.context_length", 4096),
        n_ff=_int_key(metadata, f"{arch}.feed_forward_length", 0),
        n_expert=_int_key(metadata, f"{arch}.expert_count", 0),
        n_expert_used=_int_key(metadata, f"{arch}.expert_used_count", 0),
        n_ff_exp=_int_key(metadata, f"{arch}.expert_feed_forward_length", 0),
        n_ff_shexp=_int_key(metadata, f"{arch}.expert_shared_feed_forward_length", 0),
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        ssm=_ssm_shape(arch, metadata),
        alignment=_int_key(metadata, "general.alignment", DEFAULT_ALIGNMENT),
        layers=tuple(layers),
        tensors=tuple(tensors),
    )
