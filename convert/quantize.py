"""Quantization recipes (which tensor gets which type) and `python -m convert quantize`.

A recipe is a pure function of the tensors' names, shapes and kinds (read from the GGUF header by
offload.gguf_shape). It yields ordered (regex, type) rules that llama.cpp's `llama_model_quantize` applies
(first match wins, like llama-quantize's --tensor-type), and `plan_quantization` predicts, tensor by tensor,
the type llama.cpp will write, repeating llama.cpp's own rules (src/llama-quant.cpp): which tensors it never
quantizes (vectors, norms, MoE routers, the SSM conv kernel) and which compatible type it falls back to
when a row length is not a multiple of the type's block size. The prediction is what the size report uses
and what the tests compare with the written file.

Recipes:
- `default`: llama.cpp's own mixture for the file type (no rules; the plan is not predicted).
- `moe-offload`: for a model whose routed experts live in CPU RAM while everything else sits on the GPU
  (the offload planner's layout). Routed experts get the requested bit width (`--type`; the down projection
  one step more for the _M/_L mixes, as llama.cpp's mixes favour ffn_down); everything the GPU holds
  (attention, Gated DeltaNet/SSM projections, shared experts, dense FFNs, the output head) gets the highest
  of Q8_0, Q6_K, Q5_K, or the expert type whose GPU-resident bytes fit `gpu_budget_bytes`. The token
  embedding (always in CPU RAM in llama.cpp) follows the GPU type. Routers, norms and the conv kernel are
  never quantized.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from offload.gguf_shape import GgufError, ModelShape, TensorInfo, TensorKind, read_model_shape

Q = GGMLQuantizationType
RECIPES = ("default", "moe-offload")
DEFAULT_GPU_BUDGET_BYTES = 8 << 30  # half of a 16 GiB GPU: the rest is KV cache, recurrent state, compute

# --type name → (llama_ftype, routed experts gate/up type, routed experts down type)
FILE_TYPES: dict[str, tuple[LlamaFileType, Q, Q]] = {
    "Q2_K": (LlamaFileType.MOSTLY_Q2_K, Q.Q2_K, Q.Q3_K),
    "Q3_K_S": (LlamaFileType.MOSTLY_Q3_K_S, Q.Q3_K, Q.Q3_K),
    "Q3_K_M": (LlamaFileType.MOSTLY_Q3_K_M, Q.Q3_K, Q.Q4_K),
    "Q3_K_L": (LlamaFileType.MOSTLY_Q3_K_L, Q.Q3_K, Q.Q5_K),
    "Q4_0": (LlamaFileType.MOSTLY_Q4_0, Q.Q4_0, Q.Q4_0),
    "Q4_1": (LlamaFileType.MOSTLY_Q4_1, Q.Q4_1, Q.Q4_1),
    "Q4_K_S": (LlamaFileType.MOSTLY_Q4_K_S, Q.Q4_K, Q.Q4_K),
    "Q4_K_M": (LlamaFileType.MOSTLY_Q4_K_M, Q.Q4_K, Q.Q5_K),
    "Q5_0": (LlamaFileType.MOSTLY_Q5_0, Q.Q5_0, Q.Q5_0),
    "Q5_1": (LlamaFileType.MOSTLY_Q5_1, Q.Q5_1, Q.Q5_1),
    "Q5_K_S": (LlamaFileType.MOSTLY_Q5_K_S, Q.Q5_K, Q.Q5_K),
    "Q5_K_M": (LlamaFileType.MOSTLY_Q5_K_M, Q.Q5_K, Q.Q6_K),
    "Q6_K": (LlamaFileType.MOSTLY_Q6_K, Q.Q6_K, Q.Q6_K),
    "Q8_0": (LlamaFileType.MOSTLY_Q8_0, Q.Q8_0, Q.Q8_0),
}
GPU_TYPE_CHOICES = (Q.Q8_0, Q.Q6_K, Q.Q5_K)
_SOURCE_TYPES = frozenset({Q.F32, Q.F16, Q.BF16})
_ON_GPU_KINDS = frozenset(
    {
        TensorKind.ATTENTION,
        TensorKind.SSM,
        TensorKind.NORM,
        TensorKind.DENSE_FFN,
        TensorKind.ROUTER,
        TensorKind.SHARED_EXPERT,
        TensorKind.OUTPUT,
        TensorKind.OTHER,
    }
)
# llama.cpp's tensor_type_fallback (src/llama-quant.cpp): 256-block types fall back to a 32-block one.
_FALLBACK: dict[Q, Q] = {
    Q.Q2_K: Q.Q4_0,
    Q.Q3_K: Q.Q4_0,
    Q.Q4_K: Q.Q5_0,
    Q.Q5_K: Q.Q5_1,
    Q.Q6_K: Q.Q8_0,
    Q.IQ4_XS: Q.IQ4_NL,
}


class QuantizeError(ValueError):
    """The input, type or recipe cannot be used; the message says why."""


@dataclass(frozen=True)
class TypeRule:
    pattern: str  # regex searched in the tensor name
    ggml_type: Q
    why: str


@dataclass(frozen=True)
class Recipe:
    name: str
    file_type: str
    ftype: LlamaFileType
    rules: tuple[TypeRule, ...]  # empty: llama.cpp's own mixture
    gpu_type: Q | None = None  # moe-offload: the type of the GPU-resident weights

    def tensor_types(self) -> list[tuple[str, str]]:
        """The rules as llama_model_quantize's (pattern, type name) overrides."""
        return [(rule.pattern, rule.ggml_type.name.lower()) for rule in self.rules]


@dataclass(frozen=True)
class PlannedType:
    name: str
    kind: TensorKind
    shape: tuple[int, ...]
    source_type: Q
    target_type: Q
    source_bytes: int
    target_bytes: int

    @property
    def on_gpu(self) -> bool:
        return self.kind in _ON_GPU_KINDS


@dataclass(frozen=True)
class SizeSplit:
    """Bytes of a model split the way the offload plan places them."""

    gpu: int  # attention, SSM, shared experts, norms, routers, output head
    experts: int  # routed experts (CPU RAM under moe-offload)
    embedding: int  # token_embd (CPU RAM in llama.cpp)

    @property
    def total(self) -> int:
        return self.gpu + self.experts + self.embedding


@dataclass(frozen=True)
class QuantizeReport:
    src: Path
    dst: Path
    recipe: Recipe
    before: SizeSplit
    predicted: SizeSplit | None  # None for the default recipe
    after: SizeSplit
    file_bytes_before: int
    file_bytes_after: int

    def render(self) -> str:
        def split(label: str, s: SizeSplit) -> str:
            return (
                f"  {label:<10} total {_gib(s.total)}  gpu-resident {_gib(s.gpu)}  routed experts "
                f"{_gib(s.experts)}  token embedding {_gib(s.embedding)}"
            )

        gpu = f", GPU-resident weights as {self.recipe.gpu_type.name}" if self.recipe.gpu_type else ""
        lines = [
            f"quantized {self.src} -> {self.dst} ({self.recipe.file_type}, recipe {self.recipe.name}{gpu})",
            split("before", self.before),
        ]
        if self.predicted is not None:
            lines.append(split("planned", self.predicted))
        lines.append(split("after", self.after))
        lines.append(f"  file size {_gib(self.file_bytes_before)} -> {_gib(self.file_bytes_after)}")
        return "\n".join(lines)


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / (1 << 30):.3f} GiB"


# ---------------------------------------------------------------- llama.cpp's per-tensor rules


def n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: the rank without trailing 1s (at least 1)."""
    rank = len(shape)
    while rank > 1 and shape[rank - 1] == 1:
        rank -= 1
    return max(rank, 1)


def llama_cpp_quantizes(name: str, shape: Sequence[int]) -> bool:
    """Whether llama_model_quantize touches this tensor at all (tensor_allows_quantization, the parts
    that concern the architectures converted here)."""
    if n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    return not any(part in name for part in ("_norm.weight", "ffn_gate_inp.weight", "ssm_conv1d"))


def with_fallback(ggml_type: Q, n_columns: int) -> Q:
    """The type llama.cpp actually writes when rows of `n_columns` values do not fill whole blocks."""
    if n_columns % GGML_QUANT_SIZES[ggml_type][0] == 0:
        return ggml_type
    fallback = _FALLBACK.get(ggml_type, ggml_type)
    return fallback if n_columns % GGML_QUANT_SIZES[fallback][0] == 0 else Q.F16


def tensor_bytes(shape: Sequence[int], ggml_type: Q) -> int:
    block_size, block_bytes = GGML_QUANT_SIZES[ggml_type]
    n_values = 1
    for dim in shape:
        n_values *= dim
    return n_values // block_size * block_bytes


def first_match(rules: Sequence[TypeRule], name: str) -> TypeRule | None:
    return next((rule for rule in rules if re.search(rule.pattern, name)), None)


def plan_types(tensors: Sequence[TensorInfo], rules: Sequence[TypeRule]) -> list[PlannedType]:
    """The type llama.cpp will give each tensor under `rules` (which must cover every quantizable one)."""
    planned = []
    for tensor in tensors:
        source = Q(tensor.ggml_type)
        target = source
        if llama_cpp_quantizes(tensor.name, tensor.shape):
            rule = first_match(rules, tensor.name)
            if rule is None:
                raise QuantizeError(f"no rule of the recipe covers {tensor.name}")
            target = with_fallback(rule.ggml_type, tensor.shape[0])
        planned.append(
            PlannedType(
                name=tensor.name,
                kind=tensor.kind,
                shape=tensor.shape,
                source_type=source,
                target_type=target,
                source_bytes=tensor.n_bytes,
                target_bytes=tensor_bytes(tensor.shape, target),
            )
        )
    return planned


# ---------------------------------------------------------------- recipes


def moe_offload_rules(expert_gate_up: Q, expert_down: Q, gpu_type: Q) -> tuple[TypeRule, ...]:
    return (
        TypeRule(r"ffn_(gate|up|gate_up)_exps\.weight$", expert_gate_up, "routed experts (CPU RAM)"),
        TypeRule(r"ffn_down_exps\.weight$", expert_down, "routed experts, down projection (CPU RAM)"),
        TypeRule(r".", gpu_type, "GPU-resident weights and the token embedding"),
    )


def build_recipe(
    recipe: str,
    file_type: str,
    shape: ModelShape,
    gpu_budget_bytes: int = DEFAULT_GPU_BUDGET_BYTES,
) -> Recipe:
    """The recipe for `shape`; moe-offload picks the most precise GPU type whose GPU part fits the budget."""
    if file_type not in FILE_TYPES:
        raise QuantizeError(f"unknown --type {file_type!r}; choose one of {', '.join(FILE_TYPES)}")
    ftype, expert_gate_up, expert_down = FILE_TYPES[file_type]
    if recipe == "default":
        return Recipe("default", file_type, ftype, rules=())
    if recipe != "moe-offload":
        raise QuantizeError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    if not shape.is_moe:
        raise QuantizeError(f"{shape.path.name} has no routed experts; moe-offload is for MoE models (use default)")
    candidates = [t for t in GPU_TYPE_CHOICES if _bits(t) >= _bits(expert_down)] or [expert_down]
    for gpu_type in (*candidates, expert_gate_up):
        rules = moe_offload_rules(expert_gate_up, expert_down, gpu_type)
        if split_sizes(plan_types(shape.tensors, rules), target=True).gpu <= gpu_budget_bytes:
            return Recipe("moe-offload", file_type, ftype, rules, gpu_type)
    raise QuantizeError(
        f"the GPU-resident weights need more than the GPU budget of {_gib(gpu_budget_bytes)} even as "
        f"{expert_gate_up.name}; raise the budget or offload attention too"
    )


def _bits(ggml_type: Q) -> float:
    block_size, block_bytes = GGML_QUANT_SIZES[ggml_type]
    return 8 * block_bytes / block_size


def split_sizes(planned: Sequence[PlannedType], *, target: bool) -> SizeSplit:
    def total(keep: Callable[[PlannedType], bool]) -> int:
        return sum(p.target_bytes if target else p.source_bytes for p in planned if keep(p))

    return SizeSplit(
        gpu=total(lambda p: p.on_gpu),
        experts=total(lambda p: p.kind == TensorKind.ROUTED_EXPERTS),
        embedding=total(lambda p: p.kind == TensorKind.EMBEDDING),
    )


def _shape_split(shape: ModelShape) -> SizeSplit:
    identity = [
        PlannedType(t.name, t.kind, t.shape, Q(t.ggml_type), Q(t.ggml_type), t.n_bytes, t.n_bytes)
        for t in shape.tensors
    ]
    return split_sizes(identity, target=False)


# ---------------------------------------------------------------- the command


def quantize_gguf(
    src: Path,
    dst: Path,
    file_type: str,
    *,
    recipe: str = "default",
    n_threads: int = 0,
    gpu_budget_bytes: int = DEFAULT_GPU_BUDGET_BYTES,
) -> QuantizeReport:
    """Quantize `src` into `dst` (written under a temporary name, renamed when complete)."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise QuantizeError(f"{dst} is the input file; write the quantized model to another path")
    try:
        shape = read_model_shape(src)
    except GgufError as exc:
        raise QuantizeError(str(exc)) from exc
    if len(shape.file_sizes) > 1:
        raise QuantizeError(f"{src} is split into {len(shape.file_sizes)} files; merge it first")
    already = sorted({t.type_name for t in shape.tensors if Q(t.ggml_type) not in _SOURCE_TYPES})
    if already:
        raise QuantizeError(f"{src} is already quantized ({', '.join(already)}); quantize from the f32/f16/bf16 GGUF")
    chosen = build_recipe(recipe, file_type, shape, gpu_budget_bytes)
    predicted = split_sizes(plan_types(shape.tensors, chosen.rules), target=True) if chosen.rules else None
    from bindings.quantize import quantize_file  # deferred: loads llama.cpp

    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        quantize_file(src, tmp, int(chosen.ftype), chosen.tensor_types(), n_threads)
        result = read_model_shape(tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return QuantizeReport(
        src=src,
        dst=dst,
        recipe=chosen,
        before=_shape_split(shape),
        predicted=predicted,
        after=_shape_split(result),
        file_bytes_before=src.stat().st_size,
        file_bytes_after=dst.stat().st_size,
    )
