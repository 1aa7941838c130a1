"""Check a plan against what llama.cpp reports it allocated.

`expected_buffers(plan, shape)` names every buffer llama.cpp will log while loading the plan
("load_tensors: CPU_Mapped model buffer size = ...", "llama_kv_cache: CPU KV buffer size = ...",
"llama_memory_recurrent: ... RS buffer size", "sched_reserve: ... compute buffer size", "... output buffer
size") with the bytes the planner predicts for it. `check(expected, report)` pairs them with a report read
from the log (bindings.memory_report.MemoryReport has the expected attributes) and gives the error of each.

Buffer names follow llama.cpp: model weights in "CPU_Mapped" (mmap: the span of the file holding the CPU
tensors, llama-model-loader.cpp get_mapping_range) or "CPU" (no mmap), "CUDA<i>" on GPUs; KV cache, recurrent
state and compute buffers in "CPU" (no GPU) or "CUDA<i>" / "CUDA_Host" (the host buffer of the first GPU
used for the CPU's share when a GPU exists).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from offload.compute import CPU_ALIGNMENT, CUDA_ALIGNMENT
from offload.gguf_shape import ModelShape, TensorInfo, TensorKind, row_bytes
from offload.hardware import MIB
from offload.planner import Plan, context_sizes, cuda_tensor_bytes, pad_to

# llama.cpp logs sizes in MiB with two decimals
LOG_RESOLUTION_BYTES = int(0.006 * MIB)


class MemoryReportLike(Protocol):
    @property
    def model_bytes(self) -> Mapping[str, int]: ...

    @property
    def kv_cache_bytes(self) -> Mapping[str, int]: ...

    @property
    def recurrent_state_bytes(self) -> Mapping[str, int]: ...

    @property
    def compute_bytes(self) -> Mapping[str, int]: ...

    @property
    def output_bytes(self) -> Mapping[str, int]: ...


@dataclass(frozen=True)
class ExpectedBuffers:
    model: Mapping[str, int]
    kv: Mapping[str, int]
    recurrent: Mapping[str, int]
    compute: Mapping[str, int]
    output: Mapping[str, int]


@dataclass(frozen=True)
class BufferCheck:
    kind: str  # model, kv, recurrent, compute, output
    name: str  # llama.cpp's buffer name
    predicted_bytes: int
    reported_bytes: int

    @property
    def relative_error(self) -> float:
        if self.reported_bytes == 0:
            return 0.0 if self.predicted_bytes == 0 else float("inf")
        return (self.predicted_bytes - self.reported_bytes) / self.reported_bytes

    def within(self, tolerance: float) -> bool:
        """Whether the prediction is within `tolerance` (relative), allowing for the log's 0.01 MiB rounding."""
        return abs(self.predicted_bytes - self.reported_bytes) <= tolerance * self.reported_bytes + LOG_RESOLUTION_BYTES


def _host_buffer_name(plan: Plan) -> str:
    return "CUDA_Host" if any(d.kind == "gpu" for d in plan.devices) else "CPU"


def _tensor_device(tensor: TensorInfo, plan: Plan) -> str:
    if tensor.kind == TensorKind.EMBEDDING:
        return "CPU"
    if tensor.layer is None:
        return plan.output_device
    layer = plan.layers[tensor.layer]
    if tensor.kind == TensorKind.ROUTED_EXPERTS and layer.experts_device is not None:
        return layer.experts_device
    return layer.device


def expected_buffers(plan: Plan, shape: ModelShape) -> ExpectedBuffers:
    """The buffers llama.cpp will allocate for `plan`, by the names it logs them under."""
    model: dict[str, int] = {}
    spans: dict[int, tuple[int, int]] = {}
    for tensor in shape.tensors:
        device = _tensor_device(tensor, plan)
        if device == "CPU":
            if plan.use_mmap:
                first, last = spans.get(tensor.file_index, (tensor.offset, tensor.offset))
                spans[tensor.file_index] = (min(first, tensor.offset), max(last, tensor.offset + tensor.n_bytes))
            else:
                model["CPU"] = model.get("CPU", 0) + pad_to(tensor.n_bytes, CPU_ALIGNMENT)
        else:
            model[device] = model.get(device, 0) + cuda_tensor_bytes(tensor)
    if spans:
        model["CPU_Mapped"] = sum(last - first for first, last in spans.values())
    tied = not any(t.name == "output.weight" for t in shape.tensors)
    if tied and plan.output_device != "CPU":
        embedding = next(t for t in shape.tensors if t.kind == TensorKind.EMBEDDING)
        model[plan.output_device] = model.get(plan.output_device, 0) + cuda_tensor_bytes(embedding)

    host = _host_buffer_name(plan)
    _, n_ctx = context_sizes(plan.ctx, plan.parallel)
    kv: dict[str, int] = {}
    recurrent: dict[str, int] = {}
    rows = max(1, plan.parallel)
    kv_type = int(plan.kv_type.ggml_type)
    for layer in shape.layers:
        device = plan.layers[layer.index].device
        alignment = CPU_ALIGNMENT if device == "CPU" else CUDA_ALIGNMENT
        if layer.has_kv:
            k = pad_to(row_bytes(kv_type, layer.n_embd_k_gqa) * n_ctx, alignment)
            v = pad_to(row_bytes(kv_type, layer.n_embd_v_gqa) * n_ctx, alignment)
            kv[device] = kv.get(device, 0) + k + v
        if layer.is_recurrent and shape.ssm is not None:
            r = pad_to(shape.ssm.n_embd_r * 4 * rows, alignment)
            s = pad_to(shape.ssm.n_embd_s * 4 * rows, alignment)
            recurrent[device] = recurrent.get(device, 0) + r + s
    compute = {(host if d.kind == "cpu" else d.name): d.compute_bytes for d in plan.devices if d.compute_bytes}
    output = {host: shape.n_vocab * plan.parallel * 4}
    return ExpectedBuffers(model, kv, recurrent, compute, output)


def check(expected: ExpectedBuffers, report: MemoryReportLike) -> tuple[BufferCheck, ...]:
    """Every buffer predicted or reported, with both sizes (0 where one side has none)."""
    pairs = (
        ("model", expected.model, report.model_bytes),
        ("kv", expected.kv, report.kv_cache_bytes),
        ("recurrent", expected.recurrent, report.recurrent_state_bytes),
        ("compute", expected.compute, report.compute_bytes),
        ("output", expected.output, report.output_bytes),
    )
    checks = []
    for kind, predicted, reported in pairs:
        for name in sorted(set(predicted) | set(reported)):
            checks.append(BufferCheck(kind, name, predicted.get(name, 0), reported.get(name, 0)))
    return tuple(checks)
