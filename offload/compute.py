"""Predict llama.cpp's compute buffers by replaying its graph allocator on a symbolic copy of its graph.

A compute buffer's size is not a formula: llama.cpp builds the worst-case graph (one full micro-batch), and
ggml's graph allocator (ggml/src/ggml-alloc.c) places every intermediate tensor in a buffer, reusing freed
blocks best-fit and computing some ops in place. How much the blocks fragment decides the size (SmolLM2's
CPU buffer is 25% larger than the largest set of simultaneously live tensors). So this module does what
llama.cpp does, symbolically:

1. build the graph of the architecture with the shapes llama.cpp uses for its reservation
   (src/llama-context.cpp:629 sched_reserve: n_tokens = min(n_ctx, n_ubatch) split over n_seq_max
   sequences, n_outputs = min(n_tokens, n_outputs_max), the whole KV cache visible), node order being
   ggml's depth-first visit (ggml/src/ggml.c ggml_visit_parents_graph) of each ggml_build_forward_expand;
2. assign every node to a device the way ggml_backend_sched does for these graphs (ops run where their
   weights are; ops on CPU-resident weights run on the first GPU for batches of >= 32 tokens, `op_offload`,
   ggml-backend.cpp:970, with the weight copied into that GPU's compute buffer, one weight per split); the
   host's share goes to the first GPU's pinned host buffer (llama-context.cpp:413, "CUDA_Host");
3. run a line-by-line port of ggml_gallocr_alloc_graph_impl (ggml-alloc.c:718) and ggml_dyn_tallocr_alloc
   (ggml-alloc.c:202) over it, for the prompt-processing graph and the token-generation graph (each buffer
   keeps its largest size).

On this machine (CPU build) the replay matches llama.cpp's logged compute buffers to the 0.01 MiB the log
shows: SmolLM2 over ten configurations (tests/offload/test_offload_compute.py), SmolLM2 and tiny qwen3next
and qwen3moe models through whole plans (test_offload_llama.py), and, while this was written, tiny llama,
qwen3, qwen3moe and qwen3next (both GGUF layouts) over eight configurations each, f16 / q8_0 / q4_0 KV.
The GPU side follows the same code paths but could not be checked here.

Graphs are built for llama-style dense models (llama, qwen2, qwen3, ...), qwen3moe-style MoE and qwen3next
(Gated DeltaNet + gated attention + MoE with a shared expert), mirroring src/models/{llama,qwen3,qwen3moe,
qwen3next}.cpp, src/models/delta-net-base.cpp and src/llama-graph.cpp (build_attn, build_ffn,
build_moe_ffn, build_rs). Other architectures fall back to the llama-style graph, an approximation.
Everything here is pure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import prod

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from offload.gguf_shape import KvType, ModelShape, TensorInfo, TensorKind

F32 = int(GGMLQuantizationType.F32)
F16 = int(GGMLQuantizationType.F16)
I32 = int(GGMLQuantizationType.I32)
I64 = int(GGMLQuantizationType.I64)

CPU_ALIGNMENT = 32  # TENSOR_ALIGNMENT (ggml-backend.cpp ggml_backend_cpu_buffer_type_get_alignment)
CUDA_ALIGNMENT = 128  # ggml_backend_cuda_buffer_type_get_alignment
CUDA_MATRIX_ROW_PADDING = 512  # MATRIX_ROW_PADDING: quantized rows are padded to it in CUDA buffers
OP_OFFLOAD_MIN_BATCH = 32  # GGML_OP_OFFLOAD_MIN_BATCH default (ggml-cuda.cu op_offload_min_batch_size)
MAX_FREE_BLOCKS = 256
GGML_SCHED_MAX_COPIES = 4

_FLAG_INPUT = 1
_FLAG_OUTPUT = 2

# ggml-alloc.c ggml_op_can_inplace
_INPLACE_OPS = frozenset(
    {
        "FILL",
        "SCALE",
        "DIAG_MASK_ZERO",
        "DIAG_MASK_INF",
        "ADD",
        "ADD_ID",
        "ADD1",
        "SUB",
        "MUL",
        "DIV",
        "SQR",
        "SQRT",
        "LOG",
        "UNARY",
        "ROPE",
        "ROPE_BACK",
        "SILU_BACK",
        "RMS_NORM",
        "RMS_NORM_BACK",
        "CLAMP",
        "SOFT_MAX",
        "SOFT_MAX_BACK",
    }
)

CPU_DEVICE = -1  # device index of the host; GPUs are 0..n-1


class _UnsupportedGraph(Exception):
    """The model's graph is not one this module replays (its tensors do not match the builders)."""


_TYPE_SIZES: dict[int, tuple[int, int]] = {int(t): size for t, size in GGML_QUANT_SIZES.items()}


def _type_size(ggml_type: int) -> tuple[int, int]:
    return _TYPE_SIZES[ggml_type]


def _row_size(ggml_type: int, n_elements: int) -> int:
    """ggml_row_size, with its integer arithmetic (a head narrower than a quant block is allowed)."""
    block_size, type_size = _type_size(ggml_type)
    return type_size * n_elements // block_size


class _Tensor:
    """A ggml_tensor as far as allocation is concerned (identity matters, so not a dataclass)."""

    __slots__ = (
        "allocated",
        "buffer_id",
        "device",
        "external",
        "flags",
        "n_children",
        "n_views",
        "name",
        "nb",
        "ne",
        "offset",
        "op",
        "src",
        "type",
        "view_offs",
        "view_src",
    )

    view_src: _Tensor | None
    view_offs: int

    def __init__(
        self,
        ggml_type: int,
        ne: Sequence[int],
        op: str = "NONE",
        src: Sequence[_Tensor | None] = (),
        *,
        view_of: _Tensor | None = None,
        view_offs: int = 0,
        nb: Sequence[int] | None = None,
        name: str = "",
        device: int = CPU_DEVICE,
        external: bool = False,
    ) -> None:
        self.type = ggml_type
        self.ne = (*tuple(ne), 1, 1, 1, 1)[:4]
        self.op = op
        self.src = tuple(src)
        self.flags = 0
        self.name = name
        self.device = device
        self.external = external  # lives in a buffer of its own (weights, KV cache, recurrent state)
        if view_of is not None and view_of.view_src is not None:
            view_offs += view_of.view_offs
            view_of = view_of.view_src
        self.view_src = view_of
        self.view_offs = view_offs
        if nb is None:
            block_size, type_size = _type_size(ggml_type)
            strides = [type_size, type_size * (self.ne[0] // block_size)]
            strides.append(strides[1] * self.ne[1])
            strides.append(strides[2] * self.ne[2])
            nb = strides
        self.nb = tuple(nb)
        # ggml-alloc's per-tensor bookkeeping (struct hash_node), reset for every allocation run
        self.n_children = 0
        self.n_views = 0
        self.buffer_id = 0
        self.offset = 0
        self.allocated = False

    @property
    def n_elements(self) -> int:
        return prod(self.ne)

    def nbytes(self) -> int:
        """ggml_nbytes."""
        if any(n <= 0 for n in self.ne):
            return 0
        block_size, type_size = _type_size(self.type)
        if block_size == 1:
            return type_size + sum((self.ne[i] - 1) * self.nb[i] for i in range(4))
        size = self.ne[0] * self.nb[0] // block_size
        return size + sum((self.ne[i] - 1) * self.nb[i] for i in range(1, 4))

    def is_contiguous(self) -> bool:
        return self.nb == _Tensor(self.type, self.ne).nb


# ---------------------------------------------------------------------------------------------------------
# Graph construction (a small subset of ggml.c: shapes, sources and views only)


class _Graph:
    """Nodes and leafs in ggml's order, plus the ops the model graphs need."""

    def __init__(self) -> None:
        self.nodes: list[_Tensor] = []
        self.leafs: list[_Tensor] = []
        self._visited: set[int] = set()
        self.device = CPU_DEVICE  # where new nodes are assigned (set per layer by the builders)

    # -- graph order ---------------------------------------------------------------------------------------
    def expand(self, tensor: _Tensor) -> None:
        """ggml_build_forward_expand: depth-first, sources left to right, then the node itself."""
        stack: list[tuple[_Tensor, int]] = [(tensor, 0)]
        while stack:
            node, next_src = stack.pop()
            if next_src == 0:
                if id(node) in self._visited:
                    continue
                self._visited.add(id(node))
            if next_src < len(node.src):
                stack.append((node, next_src + 1))
                src = node.src[next_src]
                if src is not None and id(src) not in self._visited:
                    stack.append((src, 0))
                continue
            if node.op == "NONE":
                self.leafs.append(node)
            else:
                self.nodes.append(node)

    # -- tensor creation -----------------------------------------------------------------------------------
    def new(self, ggml_type: int, ne: Sequence[int], op: str, src: Sequence[_Tensor | None], name: str = "") -> _Tensor:
        return _Tensor(ggml_type, ne, op, src, name=name, device=self.device)

    def input(self, ggml_type: int, ne: Sequence[int], name: str) -> _Tensor:
        tensor = _Tensor(ggml_type, ne, name=name, device=self.device)
        tensor.flags |= _FLAG_INPUT
        return tensor

    @staticmethod
    def external(ggml_type: int, ne: Sequence[int], name: str, device: int, nb: Sequence[int] | None = None) -> _Tensor:
        return _Tensor(ggml_type, ne, name=name, device=device, external=True, nb=nb)

    # -- views ---------------------------------------------------------------------------------------------
    def view(self, a: _Tensor, ne: Sequence[int], nb: Sequence[int], offset: int, op: str = "VIEW") -> _Tensor:
        full_nb = list(nb) + [0] * (3 - len(nb))
        strides = [a.nb[0], *full_nb[:3]]
        shape = (*tuple(ne), 1, 1, 1)[:4]
        # ggml_view_impl fills the unused strides as if the view were contiguous above its last dimension
        for i in range(len(nb) + 1, 4):
            strides[i] = strides[i - 1] * shape[i - 1]
        return _Tensor(a.type, shape, op, (a,), view_of=a, view_offs=offset, nb=strides, device=self.device)

    def view_tensor(self, a: _Tensor, op: str) -> _Tensor:
        return _Tensor(a.type, a.ne, op, (), view_of=a, view_offs=0, nb=a.nb, device=self.device)

    def reshape(self, a: _Tensor, ne: Sequence[int]) -> _Tensor:
        return _Tensor(a.type, ne, "RESHAPE", (a,), view_of=a, view_offs=0, device=self.device)

    def permute(self, a: _Tensor, axes: tuple[int, int, int, int]) -> _Tensor:
        ne = [0, 0, 0, 0]
        nb = [0, 0, 0, 0]
        for i, axis in enumerate(axes):
            ne[axis] = a.ne[i]
            nb[axis] = a.nb[i]
        return _Tensor(a.type, ne, "PERMUTE", (a,), view_of=a, view_offs=0, nb=nb, device=self.device)

    def transpose(self, a: _Tensor) -> _Tensor:
        return self.permute(a, (1, 0, 2, 3))

    # -- ops -----------------------------------------------------------------------------------------------
    def dup(self, a: _Tensor, op: str, src: Sequence[_Tensor | None]) -> _Tensor:
        return self.new(a.type, a.ne, op, src)

    def inplace(self, a: _Tensor, op: str, src: Sequence[_Tensor | None]) -> _Tensor:
        result = self.view_tensor(a, op)
        result.src = tuple(src)
        return result

    def mul_mat(self, w: _Tensor, x: _Tensor) -> _Tensor:
        return self.new(F32, (w.ne[1], x.ne[1], x.ne[2], x.ne[3]), "MUL_MAT", (w, x))

    def mul_mat_id(self, w: _Tensor, x: _Tensor, ids: _Tensor) -> _Tensor:
        return self.new(F32, (w.ne[1], ids.ne[0], x.ne[2], 1), "MUL_MAT_ID", (w, x, ids))

    def get_rows(self, a: _Tensor, rows: _Tensor) -> _Tensor:
        out_type = I32 if a.type == I32 else F32
        return self.new(out_type, (a.ne[0], rows.ne[0], rows.ne[1], rows.ne[2]), "GET_ROWS", (a, rows))

    def unary(self, a: _Tensor) -> _Tensor:
        return self.dup(a, "UNARY", (a,))

    def binary(self, op: str, a: _Tensor, b: _Tensor) -> _Tensor:
        return self.dup(a, op, (a, b))

    def rms_norm(self, a: _Tensor) -> _Tensor:
        return self.dup(a, "RMS_NORM", (a,))

    def norm_mul(self, a: _Tensor, weight: _Tensor | None) -> _Tensor:
        """build_norm (RMS) with an optional weight."""
        cur = self.rms_norm(a)
        return self.binary("MUL", cur, weight) if weight is not None else cur

    def rope(self, a: _Tensor, pos: _Tensor) -> _Tensor:
        return self.dup(a, "ROPE", (a, pos, None))

    def cont(self, a: _Tensor, ne: Sequence[int] | None = None) -> _Tensor:
        return self.new(a.type, ne if ne is not None else a.ne, "CONT", (a,))

    def glu_split(self, a: _Tensor, b: _Tensor) -> _Tensor:
        return self.new(a.type, a.ne, "GLU", (a, b))

    def set_rows(self, dst: _Tensor, values: _Tensor, idxs: _Tensor) -> _Tensor:
        result = self.view_tensor(dst, "SET_ROWS")
        result.src = (values, idxs, dst)
        return result

    def cpy(self, a: _Tensor, b: _Tensor) -> _Tensor:
        result = self.view_tensor(b, "CPY")
        result.src = (a, b)
        return result


@dataclass(frozen=True)
class ComputeConfig:
    """One context configuration, as llama.cpp will reserve it."""

    n_ctx_seq: int  # KV cells per sequence (after llama.cpp's padding to 256)
    n_seq: int  # n_seq_max
    n_ubatch: int
    n_batch: int
    n_outputs_max: int = 0  # 0: llama.cpp's default (n_batch)
    kv_type: KvType = KvType.F16
    flash_attn: bool = True  # llama.cpp resolves "auto" to enabled on CPU and CUDA for these models
    layer_devices: tuple[int, ...] = ()  # device of each layer's non-expert part (CPU_DEVICE = host)
    expert_devices: tuple[int, ...] = ()  # device of each layer's routed experts
    output_device: int = CPU_DEVICE
    n_gpus: int = 0
    op_offload: bool = True

    def layer_device(self, layer: int) -> int:
        return self.layer_devices[layer] if self.layer_devices else CPU_DEVICE

    def expert_device(self, layer: int) -> int:
        return self.expert_devices[layer] if self.expert_devices else self.layer_device(layer)


@dataclass(frozen=True)
class _Ubatch:
    n_tokens: int
    n_seqs: int
    n_outputs: int

    @property
    def n_seq_tokens(self) -> int:
        return self.n_tokens // self.n_seqs


class _ModelGraph:
    """Builds one reservation graph of a model (the part of llama.cpp's graph that allocation sees)."""

    def __init__(self, shape: ModelShape, config: ComputeConfig, ubatch: _Ubatch) -> None:
        self.shape = shape
        self.config = config
        self.ubatch = ubatch
        self.g = _Graph()
        self._tensors = {t.name: t for t in shape.tensors}
        self._weights: dict[str, _Tensor] = {}
        self.offload_batch = ubatch.n_tokens >= OP_OFFLOAD_MIN_BATCH and config.op_offload and config.n_gpus > 0

    # -- weights and caches ---------------------------------------------------------------------------------
    def weight(self, name: str) -> _Tensor | None:
        info = self._tensors.get(name)
        if info is None:
            return None
        cached = self._weights.get(name)
        if cached is None:
            cached = self.g.external(info.ggml_type, info.shape, name, self._weight_device(info))
            self._weights[name] = cached
        return cached

    def _weight_device(self, info: TensorInfo) -> int:
        if info.kind == TensorKind.EMBEDDING:
            return CPU_DEVICE  # llama-model.cpp load_tensors: "always keep [the input layer] on the CPU"
        if info.layer is None:
            return self.config.output_device
        if info.kind == TensorKind.ROUTED_EXPERTS:
            return self.config.expert_device(info.layer)
        return self.config.layer_device(info.layer)

    def layer_weight(self, layer: int, suffix: str) -> _Tensor | None:
        return self.weight(f"blk.{layer}.{suffix}")

    def require(self, tensor: _Tensor | None, what: str) -> _Tensor:
        if tensor is None:
            raise _UnsupportedGraph(f"{self.shape.architecture}: no tensor {what}")
        return tensor

    # -- shared pieces ----------------------------------------------------------------------------------------
    def inp_embd(self) -> _Tensor:
        g = self.g
        g.device = CPU_DEVICE
        n_embd, n_tokens = self.shape.n_embd, self.ubatch.n_tokens
        tokens = g.input(I32, (n_tokens,), "inp_tokens")
        embd_input = g.input(F32, (n_embd, n_tokens), "inp_embd")
        token_embd = self.require(self.weight("token_embd.weight"), "token_embd.weight")
        rows = g.get_rows(token_embd, tokens)
        # ggml_build_forward_select adds both candidate inputs to the graph
        g.expand(rows)
        g.expand(embd_input)
        return rows

    def kv_inputs(self) -> tuple[_Tensor, _Tensor, _Tensor]:
        g, ub = self.g, self.ubatch
        k_idxs = g.input(I64, (ub.n_tokens,), "attn_inp_k_idxs")
        v_idxs = g.input(I64, (ub.n_tokens,), "attn_inp_v_idxs")
        mask_type = F16 if self.config.flash_attn else F32
        mask = g.input(mask_type, (self.config.n_ctx_seq, ub.n_tokens // ub.n_seqs, 1, ub.n_seqs), "attn_inp_kq_mask")
        return k_idxs, v_idxs, mask

    def kv_rotation(self) -> tuple[_Tensor | None, _Tensor | None]:
        """Hadamard rotation inputs for quantized KV (llama-kv-cache.cpp build_input_k_rot / v_rot)."""
        kv_type = self.config.kv_type
        if kv_type == KvType.F16 or self.shape.head_dim_k % 64:
            return None, None
        n_rot = 64
        while self.shape.head_dim_k % (n_rot * 2) == 0:
            n_rot *= 2
        k_rot = self.g.input(F32, (n_rot, n_rot), "attn_inp_k_rot")
        v_rot = self.g.input(F32, (64, 64), "attn_inp_v_rot")
        return k_rot, v_rot

    def hadamard(self, cur: _Tensor, rot: _Tensor) -> _Tensor:
        g = self.g
        n = rot.ne[0]
        flat = (
            g.reshape(cur, (n, cur.n_elements // n)) if cur.is_contiguous() else g.cont(cur, (n, cur.n_elements // n))
        )
        res = g.mul_mat(rot, flat)
        return g.reshape(res, cur.ne)

    def kv_cache(self, layer: int) -> tuple[_Tensor, _Tensor]:
        info = self.shape.layers[layer]
        kv_type = int(self.config.kv_type.ggml_type)
        device = self.config.layer_device(layer)
        k = self.g.external(
            kv_type, (info.n_embd_k_gqa, self.config.n_ctx_seq, self.config.n_seq), f"cache_k_l{layer}", device
        )
        v = self.g.external(
            kv_type, (info.n_embd_v_gqa, self.config.n_ctx_seq, self.config.n_seq), f"cache_v_l{layer}", device
        )
        return k, v

    def attention(
        self,
        layer: int,
        q: _Tensor,
        k: _Tensor,
        v: _Tensor,
        kv_inputs: tuple[_Tensor, _Tensor, _Tensor],
        rot: tuple[_Tensor | None, _Tensor | None],
    ) -> _Tensor:
        """build_attn (KV cache version) + build_attn_mha, up to (not including) the output projection."""
        g, ub, shape = self.g, self.ubatch, self.shape
        k_idxs, v_idxs, mask = kv_inputs
        k_rot, v_rot = rot
        if k_rot is not None:
            q = self.hadamard(q, k_rot)
            k = self.hadamard(k, k_rot)
        if v_rot is not None:
            v = self.hadamard(v, v_rot)
        g.expand(q)
        g.expand(v)
        g.expand(k)
        cache_k, cache_v = self.kv_cache(layer)
        info = shape.layers[layer]
        n_head_kv = info.n_embd_k_gqa // shape.head_dim_k
        n_stream = self.config.n_seq
        # cpy_k / cpy_v: merge heads, flatten the streams, set_rows into the cache
        k_rows = g.view(k, (info.n_embd_k_gqa, ub.n_tokens), (k.nb[2],), 0)
        cache_k_2d = (
            g.reshape(cache_k, (info.n_embd_k_gqa, self.config.n_ctx_seq * n_stream)) if n_stream > 1 else cache_k
        )
        g.expand(g.set_rows(cache_k_2d, k_rows, k_idxs))
        v_rows = g.view(v, (info.n_embd_v_gqa, ub.n_tokens), (v.nb[2],), 0)
        cache_v_2d = (
            g.reshape(cache_v, (info.n_embd_v_gqa, self.config.n_ctx_seq * n_stream)) if n_stream > 1 else cache_v
        )
        g.expand(g.set_rows(cache_v_2d, v_rows, v_idxs))
        # get_k / get_v: views over the visible cells of the ubatch's streams
        row_k = _row_size(cache_k.type, shape.head_dim_k)
        row_v = _row_size(cache_v.type, shape.head_dim_v)
        k_view = g.view(
            cache_k,
            (shape.head_dim_k, n_head_kv, self.config.n_ctx_seq, ub.n_seqs),
            (row_k, row_k * n_head_kv, row_k * n_head_kv * self.config.n_ctx_seq),
            0,
        )
        v_view = g.view(
            cache_v,
            (shape.head_dim_v, n_head_kv, self.config.n_ctx_seq, ub.n_seqs),
            (row_v, row_v * n_head_kv, row_v * n_head_kv * self.config.n_ctx_seq),
            0,
        )
        # build_attn_mha
        q = g.view(
            q,
            (q.ne[0], q.ne[1], q.ne[2] // ub.n_seqs, ub.n_seqs),
            (q.nb[1], q.nb[2], q.nb[2] * (q.ne[2] // ub.n_seqs)),
            0,
        )
        q = g.permute(q, (0, 2, 1, 3))
        k_perm = g.permute(k_view, (0, 2, 1, 3))
        v_perm = g.permute(v_view, (0, 2, 1, 3))
        if self.config.flash_attn:
            attn = g.new(F32, (v_perm.ne[0], q.ne[2], q.ne[1], q.ne[3]), "FLASH_ATTN_EXT", (q, k_perm, v_perm, mask))
            cur = g.reshape(attn, (attn.ne[0] * attn.ne[1], attn.ne[2] * attn.ne[3]))
        else:
            kq = g.mul_mat(k_perm, q)
            kq = g.new(F32, kq.ne, "SOFT_MAX", (kq, mask))
            v_t = g.cont(g.transpose(v_perm))
            kqv = g.mul_mat(v_t, kq)
            merged = g.permute(kqv, (0, 2, 1, 3))
            cur = g.cont(merged, (merged.ne[0] * merged.ne[1], merged.ne[2] * merged.ne[3]))
        g.expand(cur)
        if v_rot is not None:
            cur = self.hadamard(cur, v_rot)
        return cur

    def ffn(self, cur: _Tensor, up: _Tensor, gate: _Tensor, down: _Tensor) -> _Tensor:
        """build_ffn with SILU and a parallel gate: swiglu_split(gate(x), up(x)) then down."""
        g = self.g
        tmp = g.mul_mat(up, cur)
        gated = g.mul_mat(gate, cur)
        return g.mul_mat(down, g.glu_split(gated, tmp))

    def moe(self, layer: int, cur: _Tensor) -> _Tensor:
        """build_moe_ffn: softmax gating, top-k, weight normalisation, expert matmuls, aggregation."""
        g, shape = self.g, self.shape
        n_embd, n_tokens = cur.ne[0], cur.ne[1]
        n_expert, n_used = shape.n_expert, shape.n_expert_used
        router = self.require(self.layer_weight(layer, "ffn_gate_inp.weight"), f"blk.{layer}.ffn_gate_inp")
        logits = g.mul_mat(router, cur)
        probs = g.dup(logits, "SOFT_MAX", (logits, None))
        argsort = g.new(I32, probs.ne, "ARGSORT", (probs,))
        selected = g.view(argsort, (n_used, argsort.ne[1], argsort.ne[2], argsort.ne[3]), argsort.nb[1:], 0)
        probs_3d = g.reshape(probs, (1, n_expert, n_tokens))
        weights = g.get_rows(probs_3d, selected)
        weights_2d = g.reshape(weights, (n_used, n_tokens))
        weights_sum = g.new(weights_2d.type, (1, n_tokens), "SUM_ROWS", (weights_2d,))
        weights_sum = g.dup(weights_sum, "CLAMP", (weights_sum,))
        weights_2d = g.binary("DIV", weights_2d, weights_sum)
        weights = g.reshape(weights_2d, (1, n_used, n_tokens))
        g.expand(weights)
        cur_3d = g.reshape(cur, (n_embd, 1, n_tokens))
        up_exps = self.require(self.layer_weight(layer, "ffn_up_exps.weight"), f"blk.{layer}.ffn_up_exps")
        gate_exps = self.require(self.layer_weight(layer, "ffn_gate_exps.weight"), f"blk.{layer}.ffn_gate_exps")
        down_exps = self.require(self.layer_weight(layer, "ffn_down_exps.weight"), f"blk.{layer}.ffn_down_exps")
        up = g.mul_mat_id(up_exps, cur_3d, selected)
        gate = g.mul_mat_id(gate_exps, cur_3d, selected)
        act = g.glu_split(gate, up)
        experts = g.mul_mat_id(down_exps, act, selected)
        experts = g.binary("MUL", experts, weights)
        g.expand(experts)
        views = []
        for i in range(n_used):
            view = g.view(experts, (n_embd, n_tokens), (experts.nb[2],), i * experts.nb[1])
            g.expand(view)
            views.append(view)
        moe_out = views[0]
        for view in views[1:]:
            moe_out = g.binary("ADD", moe_out, view)
            g.expand(moe_out)
        if n_used == 1:
            moe_out = g.cont(moe_out)
        return moe_out

    def output_head(self, cur: _Tensor, inp_out_ids: _Tensor | None, get_rows_after_norm: bool) -> None:
        g = self.g
        g.device = self.config.output_device
        norm = self.weight("output_norm.weight")
        cur = g.norm_mul(cur, norm)
        embd_output = cur
        if get_rows_after_norm and inp_out_ids is not None:
            cur = g.get_rows(cur, inp_out_ids)
        output = self.weight("output.weight") or self.require(self.weight("token_embd.weight"), "output")
        if output.name == "token_embd.weight":
            # tied embeddings: llama.cpp duplicates the tensor as the output layer (TENSOR_DUPLICATED)
            info = self._tensors["token_embd.weight"]
            output = g.external(info.ggml_type, info.shape, "output (tied)", self.config.output_device)
        logits = g.mul_mat(output, cur)
        embd_output.flags |= _FLAG_OUTPUT
        cur.flags |= _FLAG_OUTPUT
        logits.flags |= _FLAG_OUTPUT
        g.expand(logits)

    # -- architectures -----------------------------------------------------------------------------------------
    def build_llama_like(self) -> None:
        """src/models/llama.cpp, qwen3.cpp (q/k norm) and qwen3moe.cpp (MoE FFN)."""
        g, shape, ub = self.g, self.shape, self.ubatch
        inp = self.inp_embd()
        pos = g.input(I32, (ub.n_tokens,), "inp_pos")
        kv_inputs = self.kv_inputs()
        rot = self.kv_rotation()
        out_ids = g.input(I32, (ub.n_outputs,), "out_ids")
        cur = inp
        for il in range(shape.n_layer):
            g.device = self.config.layer_device(il)
            inp_sa = cur
            cur = g.norm_mul(cur, self.layer_weight(il, "attn_norm.weight"))
            q, k, v = self.qkv(il, cur)
            q_norm = self.layer_weight(il, "attn_q_norm.weight")
            k_norm = self.layer_weight(il, "attn_k_norm.weight")
            # qwen3 / qwen3moe normalise q and k per head before RoPE; llama does not
            q = g.rope(g.norm_mul(q, q_norm) if q_norm is not None else q, pos)
            k = g.rope(g.norm_mul(k, k_norm) if k_norm is not None else k, pos)
            cur = self.attention(il, q, k, v, kv_inputs, rot)
            cur = g.mul_mat(self.require(self.layer_weight(il, "attn_output.weight"), "attn_output"), cur)
            if il == shape.n_layer - 1:
                cur = g.get_rows(cur, out_ids)
                inp_sa = g.get_rows(inp_sa, out_ids)
            ffn_inp = g.binary("ADD", cur, inp_sa)
            cur = g.norm_mul(ffn_inp, self.layer_weight(il, "ffn_norm.weight"))
            if self.layer_weight(il, "ffn_gate_inp.weight") is not None:
                cur = self.moe(il, cur)
            else:
                cur = self.ffn(
                    cur,
                    self.require(self.layer_weight(il, "ffn_up.weight"), "ffn_up"),
                    self.require(self.layer_weight(il, "ffn_gate.weight"), "ffn_gate"),
                    self.require(self.layer_weight(il, "ffn_down.weight"), "ffn_down"),
                )
            cur = g.binary("ADD", cur, ffn_inp)
        self.output_head(cur, None, get_rows_after_norm=False)

    def qkv(self, layer: int, cur: _Tensor) -> tuple[_Tensor, _Tensor, _Tensor]:
        """build_qkv (separate Q/K/V projections, reshaped to heads)."""
        g, shape, ub = self.g, self.shape, self.ubatch
        info = shape.layers[layer]
        wq = self.require(self.layer_weight(layer, "attn_q.weight"), "attn_q")
        wk = self.require(self.layer_weight(layer, "attn_k.weight"), "attn_k")
        wv = self.require(self.layer_weight(layer, "attn_v.weight"), "attn_v")
        n_head_kv = info.n_embd_k_gqa // shape.head_dim_k
        q = g.mul_mat(wq, cur)
        k = g.mul_mat(wk, cur)
        v = g.mul_mat(wv, cur)
        q = g.reshape(q, (shape.head_dim_k, q.ne[0] // shape.head_dim_k, ub.n_tokens))
        k = g.reshape(k, (shape.head_dim_k, n_head_kv, ub.n_tokens))
        v = g.reshape(v, (shape.head_dim_v, n_head_kv, ub.n_tokens))
        return q, k, v

    def build_qwen3next(self) -> None:
        """src/models/qwen3next.cpp: Gated DeltaNet layers, gated full attention every n-th layer, MoE."""
        g, shape, ub = self.g, self.shape, self.ubatch
        inp = self.inp_embd()
        # build_inp_mem_hybrid: recurrent-state inputs, then attention inputs
        n_rs = self.config.n_seq
        s_copy = g.input(I32, (n_rs,), "rs_s_copy")
        s_copy_main = g.view(s_copy, (ub.n_seqs,), (), 0)
        s_copy_extra = g.view(s_copy, (n_rs - ub.n_seqs,), (), ub.n_seqs * 4)
        kv_inputs = self.kv_inputs()
        rot = self.kv_rotation()
        pos = g.input(I32, (ub.n_tokens,), "inp_pos")
        out_ids = g.input(I32, (ub.n_outputs,), "out_ids")
        cur = inp
        for il in range(shape.n_layer):
            g.device = self.config.layer_device(il)
            inp_sa = cur
            cur = g.norm_mul(cur, self.layer_weight(il, "attn_norm.weight"))
            g.expand(cur)
            if shape.layers[il].is_recurrent:
                cur = self.gated_delta_net(il, cur, s_copy_main, s_copy_extra)
            else:
                cur = self.gated_attention(il, cur, pos, kv_inputs, rot)
            cur = g.binary("ADD", cur, inp_sa)
            ffn_residual = cur
            post = g.norm_mul(cur, self.layer_weight(il, "post_attention_norm.weight"))
            moe_out = self.moe(il, post)
            up_sh = self.layer_weight(il, "ffn_up_shexp.weight")
            if up_sh is not None:
                shared = self.ffn(
                    post,
                    up_sh,
                    self.require(self.layer_weight(il, "ffn_gate_shexp.weight"), "ffn_gate_shexp"),
                    self.require(self.layer_weight(il, "ffn_down_shexp.weight"), "ffn_down_shexp"),
                )
                shared_gate = g.mul_mat(
                    self.require(self.layer_weight(il, "ffn_gate_inp_shexp.weight"), "ffn_gate_inp_shexp"), post
                )
                shared_gate = g.unary(shared_gate)
                shared = g.binary("MUL", shared, shared_gate)
                cur = g.binary("ADD", moe_out, shared)
            else:
                cur = moe_out
            cur = g.binary("ADD", cur, ffn_residual)
        self.output_head(cur, out_ids, get_rows_after_norm=True)

    def gated_attention(
        self,
        layer: int,
        cur: _Tensor,
        pos: _Tensor,
        kv_inputs: tuple[_Tensor, _Tensor, _Tensor],
        rot: tuple[_Tensor | None, _Tensor | None],
    ) -> _Tensor:
        g, shape, ub = self.g, self.shape, self.ubatch
        head_dim = shape.head_dim_k
        info = shape.layers[layer]
        n_head_kv = info.n_embd_k_gqa // head_dim
        wq = self.require(self.layer_weight(layer, "attn_q.weight"), "attn_q")
        n_head = wq.ne[1] // (2 * head_dim)
        q_full = g.mul_mat(wq, cur)
        k = g.mul_mat(self.require(self.layer_weight(layer, "attn_k.weight"), "attn_k"), cur)
        v = g.mul_mat(self.require(self.layer_weight(layer, "attn_v.weight"), "attn_v"), cur)
        q_full = g.reshape(q_full, (head_dim * 2, n_head, ub.n_tokens, 1))
        q = g.view(q_full, (head_dim, n_head, ub.n_tokens, 1), q_full.nb[1:], 0)
        gate = g.view(q_full, (head_dim, n_head, ub.n_tokens, 1), q_full.nb[1:], head_dim * 4)
        k = g.reshape(k, (head_dim, n_head_kv, ub.n_tokens))
        v = g.reshape(v, (head_dim, n_head_kv, ub.n_tokens))
        q = g.norm_mul(q, self.layer_weight(layer, "attn_q_norm.weight"))
        k = g.norm_mul(k, self.layer_weight(layer, "attn_k_norm.weight"))
        q = g.rope(q, pos)
        k = g.rope(k, pos)
        cur = self.attention(layer, q, k, v, kv_inputs, rot)
        gate = g.cont(gate, (head_dim * n_head, ub.n_tokens))
        gate = g.unary(gate)
        cur = g.binary("MUL", cur, gate)
        return g.mul_mat(self.require(self.layer_weight(layer, "attn_output.weight"), "attn_output"), cur)

    def recurrent_states(self, layer: int) -> tuple[_Tensor, _Tensor]:
        ssm = self.shape.ssm
        assert ssm is not None
        device = self.config.layer_device(layer)
        rows = max(1, self.config.n_seq)
        r = self.g.external(F32, (ssm.n_embd_r, rows), f"cache_r_l{layer}", device)
        s = self.g.external(F32, (ssm.n_embd_s, rows), f"cache_s_l{layer}", device)
        return r, s

    def build_rs(self, states_all: _Tensor, state_size: int, s_copy_main: _Tensor, s_copy_extra: _Tensor) -> _Tensor:
        """llm_graph_context::build_rs for the reservation (head 0, one zeroed state)."""
        g, ub = self.g, self.ubatch
        n_rs = self.config.n_seq
        states = g.reshape(states_all, (state_size, states_all.ne[1]))
        state_zero = g.view(states, (state_size,), (), 0)
        g.expand(g.inplace(state_zero, "SCALE", (state_zero,)))
        output_states = g.get_rows(states, s_copy_main)
        g.expand(output_states)
        extra = g.get_rows(states, s_copy_extra)
        dest = g.view(states_all, (state_size, n_rs - ub.n_seqs), (states_all.nb[1],), ub.n_seqs * states_all.nb[1])
        g.expand(g.cpy(extra, dest))
        return output_states

    def gated_delta_net(self, layer: int, cur: _Tensor, s_copy_main: _Tensor, s_copy_extra: _Tensor) -> _Tensor:
        """build_layer_attn_linear with the fused gated-delta-net op (cparams.fused_gdn_ch/ar are on)."""
        g, shape, ub = self.g, self.shape, self.ubatch
        ssm = shape.ssm
        if ssm is None:
            raise _UnsupportedGraph(f"{shape.architecture}: recurrent layers without ssm.* metadata")
        head_k_dim, num_k_heads, num_v_heads = ssm.d_state, ssm.n_group, ssm.dt_rank
        head_v_dim = ssm.d_inner // num_v_heads
        n_seqs, n_seq_tokens = ub.n_seqs, ub.n_seq_tokens
        key_dim = head_k_dim * num_k_heads
        conv_channels = ssm.d_inner + 2 * ssm.n_group * ssm.d_state
        # build_qkvz
        wqkv = self.layer_weight(layer, "attn_qkv.weight")
        if wqkv is not None:
            qkv_mixed = g.reshape(g.mul_mat(wqkv, cur), (conv_channels, n_seq_tokens, n_seqs))
            z_weight = self.require(self.layer_weight(layer, "attn_gate.weight"), "attn_gate")
            z: _Tensor | None = None
        else:
            ssm_in = self.require(self.layer_weight(layer, "ssm_in.weight"), "ssm_in")
            mixed = g.mul_mat(ssm_in, cur)
            per_group = 2 * head_k_dim + 2 * head_v_dim * (num_v_heads // num_k_heads)
            mixed = g.reshape(mixed, (per_group, num_k_heads, n_seq_tokens, n_seqs))
            v_width = head_v_dim * num_v_heads // num_k_heads
            nb = mixed.nb[1:]
            q_part = g.view(mixed, (head_k_dim, num_k_heads, n_seq_tokens, n_seqs), nb, 0)
            k_part = g.view(mixed, (head_k_dim, num_k_heads, n_seq_tokens, n_seqs), nb, head_k_dim * 4)
            v_part = g.view(mixed, (v_width, num_k_heads, n_seq_tokens, n_seqs), nb, 2 * head_k_dim * 4)
            z_part = g.view(mixed, (v_width, num_k_heads, n_seq_tokens, n_seqs), nb, (2 * head_k_dim + v_width) * 4)
            z = g.cont(z_part)
            q_flat = g.cont(q_part, (key_dim, n_seq_tokens, n_seqs))
            k_flat = g.cont(k_part, (key_dim, n_seq_tokens, n_seqs))
            v_flat = g.cont(v_part, (head_v_dim * num_v_heads, n_seq_tokens, n_seqs))
            qk = g.new(F32, (2 * key_dim, n_seq_tokens, n_seqs), "CONCAT", (q_flat, k_flat))
            qkv_mixed = g.new(F32, (conv_channels, n_seq_tokens, n_seqs), "CONCAT", (qk, v_flat))
            z_weight = None
        ba = g.mul_mat(self.require(self.layer_weight(layer, "ssm_ba.weight"), "ssm_ba"), cur)
        ba_dim = 2 * num_v_heads // num_k_heads
        ba = g.reshape(ba, (ba_dim, num_k_heads, n_seq_tokens, n_seqs))
        half = num_v_heads // num_k_heads
        b = g.view(ba, (half, num_k_heads, n_seq_tokens, n_seqs), ba.nb[1:], 0)
        a = g.view(ba, (half, num_k_heads, n_seq_tokens, n_seqs), ba.nb[1:], half * 4)
        b = g.cont(b)
        beta = g.unary(b)
        alpha = g.cont(a, (num_v_heads, n_seq_tokens, n_seqs))
        alpha = g.binary("ADD", alpha, self.require(self.layer_weight(layer, "ssm_dt.bias"), "ssm_dt"))
        alpha = g.unary(alpha)
        gate = g.binary("MUL", alpha, self.require(self.layer_weight(layer, "ssm_a"), "ssm_a"))
        beta = g.reshape(beta, (1, num_v_heads, n_seq_tokens, n_seqs))
        gate = g.reshape(gate, (1, num_v_heads, n_seq_tokens, n_seqs))
        conv_all, ssm_all = self.recurrent_states(layer)
        # build_conv_state
        conv_states = self.build_rs(conv_all, ssm.n_embd_r, s_copy_main, s_copy_extra)
        conv_states = g.reshape(conv_states, (ssm.d_conv - 1, conv_channels, n_seqs))
        qkv_t = g.transpose(qkv_mixed)
        conv_input = g.new(F32, (ssm.d_conv - 1 + n_seq_tokens, conv_channels, n_seqs), "CONCAT", (conv_states, qkv_t))
        s_idx = conv_input.ne[0] - conv_states.ne[0]
        last = g.view(conv_input, (ssm.d_conv - 1, conv_channels, n_seqs), conv_input.nb[1:3], s_idx * 4)
        update = g.view(conv_all, (ssm.n_embd_r, n_seqs), (conv_all.nb[1],), 0)
        g.expand(g.cpy(last, update))
        state = self.build_rs(ssm_all, ssm.n_embd_s, s_copy_main, s_copy_extra)
        state = g.reshape(state, (head_v_dim, head_v_dim, num_v_heads, n_seqs))
        conv_kernel = self.require(self.layer_weight(layer, "ssm_conv1d.weight"), "ssm_conv1d")
        conv_out = g.new(F32, (conv_channels, n_seq_tokens, n_seqs), "SSM_CONV", (conv_input, conv_kernel))
        conv_out = g.unary(conv_out)
        row = conv_channels * 4
        q_conv = g.view(
            conv_out, (head_k_dim, num_k_heads, n_seq_tokens, n_seqs), (head_k_dim * 4, row, row * n_seq_tokens), 0
        )
        k_conv = g.view(
            conv_out,
            (head_k_dim, num_k_heads, n_seq_tokens, n_seqs),
            (head_k_dim * 4, row, row * n_seq_tokens),
            key_dim * 4,
        )
        v_conv = g.view(
            conv_out,
            (head_v_dim, num_v_heads, n_seq_tokens, n_seqs),
            (head_v_dim * 4, row, row * n_seq_tokens),
            2 * key_dim * 4,
        )
        q_conv = self.l2_norm(q_conv)
        k_conv = self.l2_norm(k_conv)
        if num_k_heads != num_v_heads:
            repeat = num_v_heads // num_k_heads
            q_r = g.reshape(q_conv, (head_k_dim, 1, num_k_heads, n_seq_tokens * n_seqs))
            k_r = g.reshape(k_conv, (head_k_dim, 1, num_k_heads, n_seq_tokens * n_seqs))
            q_rep = g.new(F32, (head_k_dim, repeat, num_k_heads, n_seq_tokens * n_seqs), "REPEAT", (q_r,))
            k_rep = g.new(F32, (head_k_dim, repeat, num_k_heads, n_seq_tokens * n_seqs), "REPEAT", (k_r,))
            q_conv = g.reshape(q_rep, (head_k_dim, num_v_heads, n_seq_tokens, n_seqs))
            k_conv = g.reshape(k_rep, (head_k_dim, num_v_heads, n_seq_tokens, n_seqs))
        # build_recurrent_attn -> build_delta_net_fused (K = 1)
        s_v = head_v_dim
        result = g.new(
            F32,
            (s_v * num_v_heads, n_seq_tokens * n_seqs + s_v * n_seqs, 1, 1),
            "GATED_DELTA_NET",
            (q_conv, k_conv, v_conv, gate, beta, state),
        )
        output = g.view(
            result,
            (s_v, num_v_heads, n_seq_tokens, n_seqs),
            (s_v * 4, s_v * num_v_heads * 4, s_v * num_v_heads * n_seq_tokens * 4),
            0,
        )
        new_state = g.view(
            result,
            (s_v, s_v, num_v_heads, n_seqs),
            (s_v * 4, s_v * s_v * 4, s_v * s_v * num_v_heads * 4),
            s_v * num_v_heads * n_seq_tokens * n_seqs * 4,
        )
        state_dest = g.view(ssm_all, (ssm.n_embd_s, n_seqs), (ssm_all.nb[1],), 0)
        g.expand(g.cpy(new_state, state_dest))
        # gated norm with z, output projection
        if z is None:
            z = g.mul_mat(self.require(z_weight, "attn_gate"), cur)
        z_4d = g.reshape(z, (head_v_dim, num_v_heads, n_seq_tokens, n_seqs))
        normed = g.norm_mul(output, self.layer_weight(layer, "ssm_norm.weight"))
        gated = g.binary("MUL", normed, g.unary(z_4d))
        final = g.reshape(gated, (head_v_dim * num_v_heads, n_seq_tokens, n_seqs))
        out = g.mul_mat(self.require(self.layer_weight(layer, "ssm_out.weight"), "ssm_out"), final)
        return g.reshape(out, (shape.n_embd, n_seq_tokens * n_seqs))

    def l2_norm(self, x: _Tensor) -> _Tensor:
        """build_gdn_l2_norm: scale(rms_norm(x))."""
        g = self.g
        normed = g.rms_norm(x)
        return g.dup(normed, "SCALE", (normed,))


# ---------------------------------------------------------------------------------------------------------
# Device assignment and the allocator


class _DynAllocator:
    """ggml_dyn_tallocr (one chunk: the CPU and CUDA buffer types have no practical size limit)."""

    def __init__(self, alignment: int) -> None:
        self.alignment = alignment
        self.blocks: list[list[int]] = [[0, 1 << 62]]  # [offset, size], sorted by offset
        self.max_size = 0

    def _aligned(self, size: int) -> int:
        return -(-size // self.alignment) * self.alignment

    def alloc(self, size: int) -> int:
        size = self._aligned(size)
        best = -1
        best_size = None
        for i, (_, block_size) in enumerate(self.blocks[:-1]):
            if block_size >= size and (best_size is None or block_size <= best_size):
                best, best_size = i, block_size
        if best == -1:
            best = len(self.blocks) - 1  # the last block grows the buffer
        block = self.blocks[best]
        offset = block[0]
        block[0] += size
        block[1] -= size
        if block[1] == 0:
            del self.blocks[best]
        self.max_size = max(self.max_size, offset + size)
        return offset

    def free(self, offset: int, size: int) -> None:
        size = self._aligned(size)
        for i, block in enumerate(self.blocks):
            if block[0] + block[1] == offset:
                block[1] += size
                if i + 1 < len(self.blocks) and block[0] + block[1] == self.blocks[i + 1][0]:
                    block[1] += self.blocks[i + 1][1]
                    del self.blocks[i + 1]
                return
            if offset + size == block[0]:
                block[0] = offset
                block[1] += size
                if i > 0 and self.blocks[i - 1][0] + self.blocks[i - 1][1] == block[0]:
                    self.blocks[i - 1][1] += block[1]
                    del self.blocks[i]
                return
        position = 0
        while position < len(self.blocks) and self.blocks[position][0] < offset:
            position += 1
        if len(self.blocks) >= MAX_FREE_BLOCKS:
            raise RuntimeError("graph allocator simulation ran out of free blocks")
        self.blocks.insert(position, [offset, size])


@dataclass(frozen=True)
class _Buffers:
    """Which allocator (compute buffer) each device's nodes go to, and how sizes are computed there."""

    n_gpus: int

    def buffer_of(self, device: int) -> int:
        return self.n_gpus if device == CPU_DEVICE else device

    def alignment(self, buffer_id: int) -> int:
        return CPU_ALIGNMENT if buffer_id == self.n_gpus else CUDA_ALIGNMENT

    def is_gpu(self, buffer_id: int) -> bool:
        return buffer_id != self.n_gpus


def _alloc_size(tensor: _Tensor, on_gpu: bool, kv_type: KvType) -> int:
    """ggml_backend_buft_get_alloc_size for the CPU / CUDA buffer types."""
    size = tensor.nbytes()
    if not on_gpu:
        return size
    block_size, _ = _type_size(tensor.type)
    if block_size > 1 and tensor.ne[0] % CUDA_MATRIX_ROW_PADDING:
        size += _row_size(tensor.type, CUDA_MATRIX_ROW_PADDING - tensor.ne[0] % CUDA_MATRIX_ROW_PADDING)
    if tensor.op == "FLASH_ATTN_EXT" and kv_type != KvType.F16:
        # fattn.cu ggml_cuda_flash_attn_ext_get_alloc_size: the MMA / tile kernels used for batches need
        # f16 copies of quantized K and V, appended to the output's allocation
        k, v = tensor.src[1], tensor.src[2]
        assert k is not None and v is not None
        size = -(-size // CUDA_ALIGNMENT) * CUDA_ALIGNMENT + k.n_elements * 2
        size = -(-size // CUDA_ALIGNMENT) * CUDA_ALIGNMENT + v.n_elements * 2
    return size


def _pipeline_parallel(config: ComputeConfig) -> bool:
    """llama-context.cpp: several GPUs holding every layer and the output, no tensor overrides."""
    all_on_gpus = bool(config.layer_devices) and all(d != CPU_DEVICE for d in config.layer_devices)
    experts_with_layers = not config.expert_devices or config.expert_devices == config.layer_devices
    return config.n_gpus > 1 and all_on_gpus and config.output_device != CPU_DEVICE and experts_with_layers


def _keep_copies(graph: _Graph, tensor: _Tensor, n_copies: int) -> None:
    """With pipeline parallelism ggml_backend_sched keeps n_copies of every graph input and split input,
    allocated first and never freed (ggml-backend.cpp: GGML_SCHED_MAX_COPIES, set_input + set_output)."""
    tensor.flags |= _FLAG_INPUT | _FLAG_OUTPUT
    for _ in range(n_copies - 1):
        twin = _Tensor(tensor.type, tensor.ne, name=f"{tensor.name} (copy)", device=tensor.device)
        twin.flags |= _FLAG_INPUT | _FLAG_OUTPUT
        graph.leafs.append(twin)


def _insert_copies(graph: _Graph, config: ComputeConfig, offload_batch: bool) -> list[_Tensor]:
    """Assign nodes to devices like ggml_backend_sched and add the copies its splits need.

    A node runs on its layer's device (set when it was built); a matmul whose weight is on another device
    runs where the weight is, except that CPU-resident weights are used on the first GPU for large batches
    (op_offload, ggml-backend.cpp ggml_backend_sched_backend_id_from_cur), through a copy of the weight in
    that GPU's compute buffer (a new split starts at each such weight, so one copy lives at a time). Tensors
    produced on one device and used on another are copied, once per (tensor, device), just before their
    first use there.
    """
    if config.n_gpus == 0:
        return graph.nodes
    n_copies = GGML_SCHED_MAX_COPIES if _pipeline_parallel(config) else 1
    if n_copies > 1:
        for leaf in list(graph.leafs):
            if leaf.flags & _FLAG_INPUT:
                _keep_copies(graph, leaf, n_copies)
    out: list[_Tensor] = []
    copies: dict[tuple[int, int], _Tensor] = {}
    for node in graph.nodes:
        weight_devices = [
            s.device for s in node.src if s is not None and s.external and s.name.startswith(("blk.", "output"))
        ]
        if node.op in ("MUL_MAT", "MUL_MAT_ID") and weight_devices:
            weight_device = weight_devices[0]
            if weight_device == CPU_DEVICE and offload_batch:
                node.device = 0
            else:
                node.device = weight_device
        elif node.op == "GET_ROWS" and node.src and node.src[0] is not None and node.src[0].name == "token_embd.weight":
            node.device = CPU_DEVICE
        new_src: list[_Tensor | None] = []
        for src in node.src:
            if (
                src is None
                or src.device == node.device
                or (src.external and not src.name.startswith(("blk.", "output")))
            ):
                new_src.append(src)
                continue
            base = src.view_src if src.view_src is not None else src
            if base.external and base.device == node.device:
                new_src.append(src)
                continue
            key = (id(src), node.device)
            copy = copies.get(key)
            if copy is None or src.external:
                copy = _Tensor(
                    src.type, src.ne, "CPY_SPLIT_INPUT", (src,), device=node.device, name=f"copy of {src.name}"
                )
                copies[key] = copy
                if n_copies > 1:
                    _keep_copies(graph, copy, n_copies)
                out.append(copy)
            new_src.append(copy)
        node.src = tuple(new_src)
        out.append(node)
    return out


def _allocate(graph: _Graph, nodes: list[_Tensor], buffers: _Buffers, kv_type: KvType) -> dict[int, int]:
    """Port of ggml_gallocr_alloc_graph_impl; returns the size each buffer reached."""
    n_buffers = buffers.n_gpus + 1
    allocators = [_DynAllocator(buffers.alignment(i)) for i in range(n_buffers)]
    sizes: dict[tuple[int, int], int] = {}

    def alloc_size(tensor: _Tensor, buffer_id: int) -> int:
        key = (id(tensor), buffer_id)
        size = sizes.get(key)
        if size is None:
            size = _alloc_size(tensor, buffers.is_gpu(buffer_id), kv_type)
            sizes[key] = size
        return size

    def allocate(tensor: _Tensor, buffer_id: int) -> None:
        if tensor.external or tensor.allocated or tensor.view_src is not None:
            return
        tensor.allocated = True
        if tensor.op in _INPLACE_OPS:
            for parent in tensor.src:
                if parent is None or not parent.allocated or parent.external:
                    continue
                if parent.flags & _FLAG_OUTPUT:
                    continue
                if parent.type != tensor.type or parent.ne != tensor.ne or parent.nb != tensor.nb:
                    continue
                if parent.n_children == 1 and parent.n_views == 0:
                    # computed in place: the node takes over its parent's memory
                    tensor.buffer_id = parent.buffer_id
                    tensor.offset = parent.offset
                    parent.allocated = False
                    return
        tensor.buffer_id = buffer_id
        tensor.offset = allocators[buffer_id].alloc(alloc_size(tensor, buffer_id))

    def free(tensor: _Tensor) -> None:
        if tensor.flags & _FLAG_OUTPUT:
            return  # graph outputs are never freed
        allocators[tensor.buffer_id].free(tensor.offset, alloc_size(tensor, tensor.buffer_id))
        tensor.allocated = False

    for leaf in graph.leafs:
        allocate(leaf, buffers.buffer_of(leaf.device))
    # count children and views; allocate graph inputs first so nothing overwrites them
    for node in nodes:
        buffer_id = buffers.buffer_of(node.device)
        if node.view_src is not None and node.op != "NONE":
            node.view_src.n_views += 1
        if node.flags & _FLAG_INPUT:
            allocate(node, buffer_id)
        for src in node.src:
            if src is None:
                continue
            src.n_children += 1
            if src.flags & _FLAG_INPUT:
                allocate(src, buffer_id)
    for node in nodes:
        buffer_id = buffers.buffer_of(node.device)
        for parent in node.src:
            if parent is not None:
                allocate(parent, buffer_id)
        allocate(node, buffer_id)
        for parent in node.src:
            if parent is None:
                continue
            parent.n_children -= 1
            if parent.n_children == 0 and parent.n_views == 0:
                view_src = parent.view_src
                if view_src is not None:
                    view_src.n_views -= 1
                    if view_src.n_views == 0 and view_src.n_children == 0 and view_src.allocated:
                        free(view_src)
                elif parent.allocated:
                    free(parent)
    return {i: allocator.max_size for i, allocator in enumerate(allocators)}


def _build(shape: ModelShape, config: ComputeConfig, ubatch: _Ubatch) -> tuple[_Graph, bool]:
    model = _ModelGraph(shape, config, ubatch)
    builder: Callable[[], None] = model.build_qwen3next if shape.architecture == "qwen3next" else model.build_llama_like
    builder()
    return model.g, model.offload_batch


def compute_buffer_sizes(shape: ModelShape, config: ComputeConfig) -> dict[int, int]:
    """Bytes of each device's compute buffer (CPU_DEVICE for the host) after llama.cpp's reservation.

    llama-context.cpp sched_reserve reserves the prompt-processing graph, then the token-generation graph
    (one token per sequence), then prompt processing again; each buffer keeps the largest size it reached.
    """
    n_seq = max(1, config.n_seq)
    n_ctx_total = config.n_ctx_seq * n_seq
    n_tokens_pp = min(n_ctx_total, config.n_ubatch)
    n_tokens_pp = -(-n_tokens_pp // n_seq) * n_seq  # graph_reserve rounds up to a multiple of n_seqs
    n_outputs_max = config.n_outputs_max or config.n_batch
    ubatches = (
        _Ubatch(n_tokens_pp, n_seq, min(min(n_ctx_total, config.n_ubatch), n_outputs_max)),
        _Ubatch(n_seq, n_seq, n_seq),
    )
    buffers = _Buffers(config.n_gpus)
    sizes: dict[int, int] = {}
    for ubatch in ubatches:
        try:
            graph, offload_batch = _build(shape, config, ubatch)
        except _UnsupportedGraph:
            return approximate_compute_buffer_sizes(shape, config)
        nodes = _insert_copies(graph, config, offload_batch)
        for buffer_id, size in _allocate(graph, nodes, buffers, config.kv_type).items():
            device = CPU_DEVICE if buffer_id == config.n_gpus else buffer_id
            sizes[device] = max(sizes.get(device, 0), size)
    return sizes


def approximate_compute_buffer_sizes(shape: ModelShape, config: ComputeConfig) -> dict[int, int]:
    """A rough estimate for architectures whose graph is not replayed: the KQ mask, a few activations per
    token, the logits of the output micro-batch, and the copy of the largest RAM-resident weight that prompt
    batches use on the first GPU (op_offload)."""
    n_tokens = min(config.n_ctx_seq * max(1, config.n_seq), config.n_ubatch)
    n_outputs = min(n_tokens, config.n_outputs_max or config.n_batch)
    width = max(shape.n_embd, shape.n_ff, shape.n_ff_exp * max(1, shape.n_expert_used))
    mask = config.n_ctx_seq * n_tokens * (2 if config.flash_attn else 4)
    activations = 6 * width * n_tokens * 4
    sizes: dict[int, int] = {}
    devices = set(config.layer_devices) if config.layer_devices else {CPU_DEVICE}
    for device in devices:
        sizes[device] = mask + activations
    output = sizes.get(config.output_device, 0)
    sizes[config.output_device] = max(output, shape.n_vocab * n_outputs * 4 + 2 * shape.n_embd * n_tokens * 4)
    if config.n_gpus and config.op_offload and n_tokens >= OP_OFFLOAD_MIN_BATCH:
        in_ram = [
            t.n_bytes
            for t in shape.tensors
            if t.layer is not None
            and (config.expert_device(t.layer) if t.kind == TensorKind.ROUTED_EXPERTS else config.layer_device(t.layer))
            == CPU_DEVICE
        ]
        if in_ram:
            sizes[0] = sizes.get(0, 0) + max(in_ram)
    sizes.setdefault(CPU_DEVICE, shape.n_embd * n_tokens * 4)
    return sizes
