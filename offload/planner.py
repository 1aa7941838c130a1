"""The planner: a pure function from (model shape, hardware, request) to the fastest placement that fits.

What it decides, and how llama.cpp will carry it out (sources: llama.cpp 0c1e57098 as vendored in
llama-cpp-python 0.3.36):
- which layers live on which GPU: llama.cpp puts the *last* `n_gpu_layers` layers on the GPUs, counting the
  output layer as one more (src/llama-model.cpp:1589 `i_gpu_start = n_layer_all + 1 - n_gpu_layers`, :1614
  the output layer is "layer" n_layer), split over several GPUs in contiguous runs by `tensor_split`;
  token_embd always stays on the CPU (:1605 "there is very little benefit to offloading the input layer");
- which layers keep their routed experts in RAM: tensor buffer-type overrides (`-ot`, `--n-cpu-moe`), regexes
  matched with std::regex_search on tensor names, first match wins (src/llama-model-loader.cpp:1235);
- the KV cache type, micro-batch size, threads and memory mapping.

Memory is accounted per device the way llama.cpp allocates it: weights (CUDA pads quantized rows to 512
elements, ggml-cuda.cu:903), the KV cache and the recurrent state on the device of their layer
(src/llama-kv-cache.cpp:217 and src/llama-memory-recurrent.cpp, with offload_kqv), compute buffers by
replaying ggml's allocator (compute.py), plus the CUDA runtime and a safety margin on GPUs and the process
on the host. RAM is never planned beyond what is available.

Speed is a bandwidth model: a decode step reads every weight it uses once (non-expert weights fully, each
layer's experts in the fraction the batch's tokens route to) plus the KV cache, from the memory of the device
that holds them; devices run one after the other, and each CPU/GPU hand-over costs a synchronisation. A
prompt micro-batch is bounded by the same reads, by compute, and, for experts kept in RAM, by copying them
over PCIe to the GPU (llama.cpp's op_offload does that for batches of >= 32 tokens). Every candidate
(KV type x micro-batch x expert placement) is scored and the best kept, not the first that fits.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from offload.compute import CPU_DEVICE, CUDA_MATRIX_ROW_PADDING, ComputeConfig, compute_buffer_sizes
from offload.gguf_shape import KvType, ModelShape, TensorInfo, TensorKind
from offload.hardware import GIB, MIB, HardwareProfile

# --- constants of the memory model -----------------------------------------------------------------------
# CUDA context, cuBLAS workspace and llama.cpp's CUDA memory pool: memory a GPU loses that llama.cpp's own
# buffers do not show (--fit's 1 GiB default margin covers this and compute buffers together).
GPU_RUNTIME_OVERHEAD = 512 * MIB
GPU_MIN_MARGIN = 256 * MIB
GPU_MARGIN_FRACTION = 0.02
# The server process itself (Python, FastAPI, llama.cpp's host-side state), and a margin for the rest of
# the machine.
HOST_PROCESS_OVERHEAD = 512 * MIB
RAM_MIN_MARGIN = 1 * GIB
RAM_MARGIN_FRACTION = 0.05
DEFAULT_MAX_CTX = 32768
MIN_DEFAULT_CTX = 4096
UBATCH_CHOICES = (512, 1024, 2048)
KV_PADDING = 256  # llama-context.cpp: n_ctx and each sequence's share are padded to multiples of 256
# quantizing the KV cache costs a little quality; only worth it for a clear speed gain
KV_QUANTIZATION_MIN_GAIN = 0.05
UBATCH_SCORE_TOLERANCE = 0.02  # take the smallest micro-batch scoring within this of the best
# The server's prompt cache (past slot states kept in RAM) gets this share of the RAM the plan leaves: the rest
# absorbs what the plan does not count (Python's heap, request buffers, allocator slack, other processes).
PROMPT_CACHE_RAM_FRACTION = 0.5

# --- constants of the speed model -------------------------------------------------------------------------
GPU_BANDWIDTH_EFFICIENCY = 0.8  # llama.cpp's quantized mat-vec kernels reach ~80% of the memory bandwidth
CPU_BANDWIDTH_EFFICIENCY = 0.8
# Rate one core streams quantized weights through llama.cpp's CPU mat-vec kernels. Measured on the 2-core
# development machine: SmolLM2-135M Q4_1 decodes at ~104 tok/s reading ~97 MB per token with 2 threads.
CPU_WEIGHT_BYTES_PER_S_PER_CORE = 5.0e9
CPU_FLOPS_PER_CORE = 40e9  # int8-dot kernels, AVX2-class core, prompt processing
GPU_FLOPS_PER_BYTE_OF_BANDWIDTH = 80.0  # quantized matmul throughput relative to bandwidth (ridge point)
PCIE_EFFICIENCY = 0.8
SPLIT_SYNC_SECONDS = 30e-6  # one hand-over between CPU and GPU compute (ggml_backend_sched split)
STEP_OVERHEAD_SECONDS = 0.5e-3  # graph build + launch per llama_decode
AVERAGE_CONTEXT_FILL = 0.5  # a decode step reads on average half of each slot's context


class PlanError(ValueError):
    """The request cannot be planned; the message says why."""


class DoesNotFitError(PlanError):
    """No placement fits; the message names the shortfall (bytes, devices) and what to change."""


@dataclass(frozen=True)
class PlanRequest:
    """What the user asks for. Unset fields are chosen by the planner."""

    ctx: int | None = None  # context tokens per slot; None: the model's trained context, at most 32768
    parallel: int = 1  # slots: sequences decoded together
    kv_type: KvType | None = None  # None: f16, or q8_0 where it buys >= 5% speed
    n_ubatch: int | None = None  # None: the best of 512 / 1024 / 2048
    n_batch: int | None = None  # None: equal to n_ubatch
    gpu_margin_bytes: int | None = None  # per GPU; None: max(256 MiB, 2% of the GPU)
    use_mlock: bool = False
    prompt_tokens_per_output_token: float = 1.0  # workload used to weigh prefill against decode
    model_name: str | None = None

    def __post_init__(self) -> None:
        if self.kv_type is not None and not isinstance(self.kv_type, KvType):
            try:
                object.__setattr__(self, "kv_type", KvType(self.kv_type))
            except ValueError:
                known = ", ".join(k.value for k in KvType)
                raise PlanError(f"unknown KV cache type {self.kv_type!r}; choose one of {known}") from None
        if self.ctx is not None and self.ctx < 1:
            raise PlanError(f"ctx must be at least 1, got {self.ctx}")
        if self.parallel < 1:
            raise PlanError(f"parallel must be at least 1, got {self.parallel}")
        if self.n_ubatch is not None and self.n_ubatch < 1:
            raise PlanError(f"n_ubatch must be at least 1, got {self.n_ubatch}")
        if self.n_batch is not None and self.n_batch < 1:
            raise PlanError(f"n_batch must be at least 1, got {self.n_batch}")
        if self.n_batch is not None and self.n_ubatch is not None and self.n_ubatch > self.n_batch:
            raise PlanError(f"n_ubatch ({self.n_ubatch}) cannot exceed n_batch ({self.n_batch})")


@dataclass(frozen=True)
class DeviceUsage:
    """Planned memory of one device; `total_bytes` never exceeds `budget_bytes`."""

    name: str  # llama.cpp's device name: CUDA0, CUDA1, ..., CPU
    kind: str  # "gpu" or "cpu"
    description: str
    budget_bytes: int  # free memory minus the safety margin
    weights_bytes: int
    kv_bytes: int
    recurrent_bytes: int
    compute_bytes: int
    overhead_bytes: int  # GPU: CUDA runtime; CPU: process overhead + llama.cpp's output buffer

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.recurrent_bytes + self.compute_bytes + self.overhead_bytes

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.total_bytes


@dataclass(frozen=True)
class LayerPlacement:
    index: int
    kind: str  # "attention" or "ssm"
    device: str  # where its attention / SSM, norms, shared expert and router live
    experts_device: str | None  # where its routed experts live; None for a dense layer
    weights_bytes: int
    expert_bytes: int


@dataclass(frozen=True)
class Prediction:
    decode_tokens_per_s: float  # all `parallel` slots generating together, tokens/s summed
    decode_tokens_per_s_single: float  # one slot alone
    prefill_tokens_per_s: float
    read_bytes_per_step: tuple[tuple[str, int], ...]  # device -> bytes read per decode step (all slots)


@dataclass(frozen=True)
class Plan:
    """The chosen placement. `to_json()` is the documented public form (see offload/README.md)."""

    model: str
    architecture: str
    model_bytes: int
    devices: tuple[DeviceUsage, ...]
    layers: tuple[LayerPlacement, ...]
    output_device: str
    n_gpu_layers: int
    tensor_split: tuple[float, ...]
    tensor_overrides: tuple[tuple[str, str], ...]
    ctx: int  # per slot, as used (llama.cpp pads it to n_ctx_seq)
    n_ctx_seq: int
    n_ctx: int
    parallel: int
    kv_type: KvType
    n_batch: int
    n_ubatch: int
    threads: int
    threads_batch: int
    use_mmap: bool
    use_mlock: bool
    use_extra_bufts: bool
    flash_attn: str
    op_offload: bool  # prompt batches may use RAM-resident weights on the first GPU (llama.cpp's default)
    predicted: Prediction
    binding_constraint: str
    tradeoffs: tuple[str, ...]
    score: float = field(repr=False)
    # Host RAM beyond the plan: the CPU's free bytes less the per-slot prompt snapshots of a recurrent model
    state_snapshot_bytes: int = 0  # RAM the server's per-slot prompt snapshots can take (recurrent models)
    ram_left_bytes: int = 0  # what is left after weights, KV, recurrent state, compute buffers and snapshots
    prompt_cache_bytes: int = 0  # the prompt cache's default budget: PROMPT_CACHE_RAM_FRACTION of ram_left_bytes

    def device(self, name: str) -> DeviceUsage:
        return next(d for d in self.devices if d.name == name)

    @property
    def gpu_expert_layers(self) -> int:
        return sum(1 for layer in self.layers if layer.experts_device not in (None, "CPU"))

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": 1,
            "model": self.model,
            "architecture": self.architecture,
            "model_bytes": self.model_bytes,
            "devices": [
                {
                    "name": d.name,
                    "kind": d.kind,
                    "description": d.description,
                    "budget_bytes": d.budget_bytes,
                    "weights_bytes": d.weights_bytes,
                    "kv_bytes": d.kv_bytes,
                    "recurrent_bytes": d.recurrent_bytes,
                    "compute_bytes": d.compute_bytes,
                    "overhead_bytes": d.overhead_bytes,
                    "total_bytes": d.total_bytes,
                    "free_bytes": d.free_bytes,
                }
                for d in self.devices
            ],
            "layers": [
                {
                    "index": layer.index,
                    "kind": layer.kind,
                    "device": layer.device,
                    "experts_device": layer.experts_device,
                    "weights_bytes": layer.weights_bytes,
                    "expert_bytes": layer.expert_bytes,
                }
                for layer in self.layers
            ],
            "output_device": self.output_device,
            "n_gpu_layers": self.n_gpu_layers,
            "tensor_split": list(self.tensor_split),
            "tensor_overrides": [{"pattern": pattern, "device": device} for pattern, device in self.tensor_overrides],
            "ctx": self.ctx,
            "n_ctx_seq": self.n_ctx_seq,
            "n_ctx": self.n_ctx,
            "parallel": self.parallel,
            "kv_type": str(self.kv_type),
            "n_batch": self.n_batch,
            "n_ubatch": self.n_ubatch,
            "threads": self.threads,
            "threads_batch": self.threads_batch,
            "use_mmap": self.use_mmap,
            "use_mlock": self.use_mlock,
            "use_extra_bufts": self.use_extra_bufts,
            "flash_attn": self.flash_attn,
            "op_offload": self.op_offload,
            "predicted": {
                "decode_tokens_per_s": round(self.predicted.decode_tokens_per_s, 3),
                "decode_tokens_per_s_single": round(self.predicted.decode_tokens_per_s_single, 3),
                "prefill_tokens_per_s": round(self.predicted.prefill_tokens_per_s, 3),
                "read_bytes_per_step": dict(self.predicted.read_bytes_per_step),
            },
            "binding_constraint": self.binding_constraint,
            "tradeoffs": list(self.tradeoffs),
            "state_snapshot_bytes": self.state_snapshot_bytes,
            "ram_left_bytes": self.ram_left_bytes,
            "prompt_cache_bytes": self.prompt_cache_bytes,
        }


# ---------------------------------------------------------------------------------------------------------
# Helpers


def pad_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def context_sizes(ctx_per_slot: int, parallel: int) -> tuple[int, int]:
    """(n_ctx_seq, n_ctx) as llama.cpp derives them from n_ctx = ctx * parallel (non-unified KV cache)."""
    n_ctx = pad_to(ctx_per_slot * parallel, KV_PADDING)
    n_ctx_seq = pad_to(n_ctx // parallel, KV_PADDING)
    return n_ctx_seq, n_ctx_seq * parallel


def gpu_name(index: int) -> str:
    return f"CUDA{index}"


def device_name(device: int) -> str:
    return "CPU" if device == CPU_DEVICE else gpu_name(device)


def cuda_tensor_bytes(tensor: TensorInfo) -> int:
    """Bytes a weight takes in a CUDA buffer: quantized rows padded to 512 elements (ggml-cuda.cu
    ggml_backend_cuda_buffer_type_get_alloc_size), each tensor aligned to 128 bytes."""
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(tensor.ggml_type)]
    size = tensor.n_bytes
    if block_size > 1 and tensor.shape[0] % CUDA_MATRIX_ROW_PADDING:
        size += (CUDA_MATRIX_ROW_PADDING - tensor.shape[0] % CUDA_MATRIX_ROW_PADDING) // block_size * type_size
    return pad_to(size, 128)


def gpu_margin(total_bytes: int, request: PlanRequest) -> int:
    if request.gpu_margin_bytes is not None:
        return request.gpu_margin_bytes
    return max(GPU_MIN_MARGIN, int(total_bytes * GPU_MARGIN_FRACTION))


def ram_margin(total_bytes: int) -> int:
    return max(RAM_MIN_MARGIN, int(total_bytes * RAM_MARGIN_FRACTION))


def state_snapshot_bytes(shape: ModelShape, ctx: int, parallel: int, kv_bytes_per_token: int) -> int:
    """RAM the server's per-slot prompt snapshots can take. Where llama.cpp cannot cut a sequence back to a
    prefix (recurrent / hybrid models), each slot keeps a copy of its prompt's state after prefill: at most its
    whole context of KV plus its recurrent state (llama_state_seq_get_data copies both to the host)."""
    if not shape.has_recurrent_layers:
        return 0
    n_ctx_seq, _ = context_sizes(ctx, parallel)
    return parallel * (n_ctx_seq * kv_bytes_per_token + shape.recurrent_bytes_per_sequence)


def prompt_cache_bytes_for(ram_left_bytes: int) -> int:
    """The prompt cache's default budget out of the RAM a plan leaves."""
    return max(0, int(ram_left_bytes * PROMPT_CACHE_RAM_FRACTION))


def host_ram_left(
    shape: ModelShape,
    *,
    ram_available_bytes: int,
    ram_total_bytes: int,
    ctx: int,
    parallel: int,
    kv_bytes_per_token: int,
) -> int:
    """RAM left when the whole model, its KV cache, recurrent state and prompt snapshots stay in host RAM,
    after the process overhead, llama.cpp's output buffer and the RAM margin: what the server's manual path
    (no --auto-offload) budgets from. It does not know how much a GPU takes, so it assumes nothing does (a
    lower bound), and it does not replay compute buffers (the margin and PROMPT_CACHE_RAM_FRACTION cover them)."""
    _, n_ctx = context_sizes(ctx, parallel)
    used = (
        shape.total_bytes
        + n_ctx * kv_bytes_per_token
        + parallel * shape.recurrent_bytes_per_sequence
        + state_snapshot_bytes(shape, ctx, parallel, kv_bytes_per_token)
        + HOST_PROCESS_OVERHEAD
        + shape.n_vocab * parallel * 4
    )
    return max(0, ram_available_bytes - ram_margin(ram_total_bytes) - used)


def experts_touched_fraction(n_expert: int, n_expert_used: int, n_tokens: int) -> float:
    """Expected fraction of a layer's experts that at least one of `n_tokens` tokens routes to."""
    if n_expert == 0:
        return 1.0
    return 1.0 - (1.0 - n_expert_used / n_expert) ** n_tokens


# ---------------------------------------------------------------------------------------------------------
# Candidate placement and its evaluation


@dataclass(frozen=True)
class _Placement:
    layer_devices: tuple[int, ...]
    expert_devices: tuple[int, ...]
    output_device: int


@dataclass(frozen=True)
class _Settings:
    kv_type: KvType
    n_ubatch: int
    n_batch: int
    ctx: int
    parallel: int


@dataclass(frozen=True)
class _Evaluation:
    placement: _Placement
    settings: _Settings
    devices: tuple[DeviceUsage, ...]
    prediction: Prediction
    score: float

    @property
    def fits(self) -> bool:
        return all(d.free_bytes >= 0 for d in self.devices)


# Compute buffer sizes by (GPU count, placement, settings): they do not depend on the memory budgets, so a
# caller planning one model many times against different budgets (offload/joint.py) shares one of these.
ComputeCache = dict[tuple[Any, ...], dict[int, int]]


class _Planner:
    def __init__(
        self,
        shape: ModelShape,
        hardware: HardwareProfile,
        request: PlanRequest,
        compute_cache: ComputeCache | None = None,
    ) -> None:
        self.shape = shape
        self.hardware = hardware
        self.request = request
        self.n_gpus = len(hardware.gpus)
        self._compute_cache: ComputeCache = {} if compute_cache is None else compute_cache
        self._tensor_device_cache: dict[_Placement, dict[int, int]] = {}
        self.tied_output = not any(t.name == "output.weight" for t in shape.tensors)
        self._by_layer: dict[int, list[TensorInfo]] = {}
        for tensor in shape.tensors:
            if tensor.layer is not None:
                self._by_layer.setdefault(tensor.layer, []).append(tensor)

    # -- memory --------------------------------------------------------------------------------------------
    def tensor_device(self, tensor: TensorInfo, placement: _Placement) -> int:
        if tensor.kind == TensorKind.EMBEDDING:
            return CPU_DEVICE
        if tensor.layer is None:
            return placement.output_device
        if tensor.kind == TensorKind.ROUTED_EXPERTS:
            return placement.expert_devices[tensor.layer]
        return placement.layer_devices[tensor.layer]

    def weights_per_device(self, placement: _Placement) -> dict[int, int]:
        cached = self._tensor_device_cache.get(placement)
        if cached is not None:
            return cached
        totals: dict[int, int] = {}
        for tensor in self.shape.tensors:
            device = self.tensor_device(tensor, placement)
            size = tensor.n_bytes if device == CPU_DEVICE else cuda_tensor_bytes(tensor)
            totals[device] = totals.get(device, 0) + size
            if tensor.kind == TensorKind.EMBEDDING and self.tied_output and placement.output_device != CPU_DEVICE:
                # tied embeddings: the output layer is a duplicate of token_embd on the output device
                # (llama-model-loader.cpp TENSOR_DUPLICATED)
                totals[placement.output_device] = totals.get(placement.output_device, 0) + cuda_tensor_bytes(tensor)
        self._tensor_device_cache[placement] = totals
        return totals

    def compute(self, placement: _Placement, settings: _Settings) -> dict[int, int]:
        n_ctx_seq, _ = context_sizes(settings.ctx, settings.parallel)
        # memoised: the search evaluates the same placement several times
        key = (
            self.n_gpus,
            placement,
            settings.kv_type,
            settings.n_ubatch,
            settings.n_batch,
            n_ctx_seq,
            settings.parallel,
        )
        cached = self._compute_cache.get(key)
        if cached is None:
            config = ComputeConfig(
                n_ctx_seq=n_ctx_seq,
                n_seq=settings.parallel,
                n_ubatch=settings.n_ubatch,
                n_batch=settings.n_batch,
                kv_type=settings.kv_type,
                layer_devices=placement.layer_devices,
                expert_devices=placement.expert_devices,
                output_device=placement.output_device,
                n_gpus=self.n_gpus,
            )
            cached = compute_buffer_sizes(self.shape, config)
            self._compute_cache[key] = cached
        return cached

    def evaluate(
        self, placement: _Placement, settings: _Settings, compute_estimate: dict[int, int] | None = None
    ) -> _Evaluation:
        """Memory and speed of a placement; `compute_estimate` stands in for the (slower) graph replay."""
        shape = self.shape
        _, n_ctx = context_sizes(settings.ctx, settings.parallel)
        weights = self.weights_per_device(placement)
        kv: dict[int, int] = {}
        recurrent: dict[int, int] = {}
        rows = max(1, settings.parallel)
        for layer in shape.layers:
            device = placement.layer_devices[layer.index]
            kv[device] = kv.get(device, 0) + n_ctx * ModelShape.kv_bytes_per_token_of_layer(layer, settings.kv_type)
            recurrent[device] = recurrent.get(device, 0) + rows * shape.recurrent_bytes_per_sequence_of_layer(layer)
        compute = compute_estimate if compute_estimate is not None else self.compute(placement, settings)
        # llama-context.cpp output_reserve(n_seq_max): logits of one token per sequence, on the host
        output_buffer = shape.n_vocab * settings.parallel * 4
        devices: list[DeviceUsage] = []
        for index, gpu in enumerate(self.hardware.gpus):
            margin = gpu_margin(gpu.total_bytes, self.request)
            devices.append(
                DeviceUsage(
                    name=gpu_name(index),
                    kind="gpu",
                    description=gpu.name,
                    budget_bytes=gpu.free_bytes - margin,
                    weights_bytes=weights.get(index, 0),
                    kv_bytes=kv.get(index, 0),
                    recurrent_bytes=recurrent.get(index, 0),
                    compute_bytes=compute.get(index, 0),
                    overhead_bytes=GPU_RUNTIME_OVERHEAD,
                )
            )
        hardware = self.hardware
        devices.append(
            DeviceUsage(
                name="CPU",
                kind="cpu",
                description=f"{hardware.cpu.model}, {hardware.cpu.physical_cores} cores",
                budget_bytes=hardware.ram_available_bytes - ram_margin(hardware.ram_total_bytes),
                weights_bytes=weights.get(CPU_DEVICE, 0),
                kv_bytes=kv.get(CPU_DEVICE, 0),
                recurrent_bytes=recurrent.get(CPU_DEVICE, 0),
                compute_bytes=compute.get(CPU_DEVICE, 0),
                overhead_bytes=HOST_PROCESS_OVERHEAD + output_buffer,
            )
        )
        prediction = self.predict(placement, settings)
        ratio = self.request.prompt_tokens_per_output_token
        score = 1.0 / (1.0 / prediction.decode_tokens_per_s + ratio / prediction.prefill_tokens_per_s)
        return _Evaluation(placement, settings, tuple(devices), prediction, score)

    # -- speed ---------------------------------------------------------------------------------------------
    def _device_read_rate(self, device: int) -> float:
        hardware = self.hardware
        if device == CPU_DEVICE:
            cores = hardware.cpu.physical_cores
            return min(
                hardware.ram_bandwidth_bytes_per_s * CPU_BANDWIDTH_EFFICIENCY, cores * CPU_WEIGHT_BYTES_PER_S_PER_CORE
            )
        return hardware.gpus[device].memory_bandwidth_bytes_per_s * GPU_BANDWIDTH_EFFICIENCY

    def _n_handovers(self, placement: _Placement, batch_offloaded: bool) -> int:
        """CPU <-> GPU transitions along the layer sequence (each is a scheduler split)."""
        sequence: list[int] = [CPU_DEVICE]  # token embeddings
        for layer in range(self.shape.n_layer):
            sequence.append(placement.layer_devices[layer])
            if self.shape.layers[layer].expert_bytes:
                expert = placement.expert_devices[layer]
                sequence.append(0 if batch_offloaded and expert == CPU_DEVICE else expert)
                sequence.append(placement.layer_devices[layer])
        sequence.append(placement.output_device)
        return sum(1 for a, b in itertools.pairwise(sequence) if a != b)

    def step_reads(self, placement: _Placement, settings: _Settings, n_tokens: int) -> dict[int, float]:
        """Bytes each device reads for one decode step of `n_tokens` sequences (one token each)."""
        shape = self.shape
        touched = experts_touched_fraction(shape.n_expert, shape.n_expert_used, n_tokens)
        reads: dict[int, float] = {}
        for tensor in shape.tensors:
            device = self.tensor_device(tensor, placement)
            if tensor.kind == TensorKind.EMBEDDING:
                amount = tensor.n_bytes / max(1, shape.n_vocab) * n_tokens  # get_rows: one row per token
            elif tensor.kind == TensorKind.ROUTED_EXPERTS:
                amount = tensor.n_bytes * touched
            else:
                amount = float(tensor.n_bytes)
            reads[device] = reads.get(device, 0.0) + amount
        if shape.output_bytes == 0:  # tied embeddings: the output matmul reads the whole token_embd
            reads[placement.output_device] = reads.get(placement.output_device, 0.0) + shape.embedding_bytes
        context = settings.ctx * AVERAGE_CONTEXT_FILL
        for layer in shape.layers:
            device = placement.layer_devices[layer.index]
            kv = ModelShape.kv_bytes_per_token_of_layer(layer, settings.kv_type) * context * n_tokens
            state = 2 * shape.recurrent_bytes_per_sequence_of_layer(layer) * n_tokens  # read and write back
            reads[device] = reads.get(device, 0.0) + kv + state
        return reads

    def decode_step_seconds(
        self, placement: _Placement, settings: _Settings, n_tokens: int
    ) -> tuple[float, dict[int, float]]:
        reads = self.step_reads(placement, settings, n_tokens)
        seconds = sum(amount / self._device_read_rate(device) for device, amount in reads.items())
        seconds += STEP_OVERHEAD_SECONDS + SPLIT_SYNC_SECONDS * self._n_handovers(placement, batch_offloaded=False)
        return seconds, reads

    def prefill_seconds_per_ubatch(self, placement: _Placement, settings: _Settings) -> float:
        shape, hardware = self.shape, self.hardware
        n_tokens = settings.n_ubatch
        offloaded = self.n_gpus > 0 and n_tokens >= 32
        touched = experts_touched_fraction(shape.n_expert, shape.n_expert_used, n_tokens)
        seconds = STEP_OVERHEAD_SECONDS + SPLIT_SYNC_SECONDS * self._n_handovers(placement, offloaded)
        pcie_bytes = 0.0
        per_device_bytes: dict[int, float] = {}
        per_device_flops: dict[int, float] = {}
        for tensor in shape.tensors:
            if tensor.kind == TensorKind.EMBEDDING:
                continue
            device = self.tensor_device(tensor, placement)
            n_elements = 1
            for dim in tensor.shape:
                n_elements *= dim
            active = n_elements
            if tensor.kind == TensorKind.ROUTED_EXPERTS:
                active = n_elements * shape.n_expert_used // max(1, shape.n_expert)
            flops = 2.0 * active * n_tokens
            read = tensor.n_bytes * (touched if tensor.kind == TensorKind.ROUTED_EXPERTS else 1.0)
            if device == CPU_DEVICE and offloaded and tensor.layer is not None:
                pcie_bytes += tensor.n_bytes  # op_offload copies the whole weight to the GPU
                device = 0
            per_device_bytes[device] = per_device_bytes.get(device, 0.0) + read
            per_device_flops[device] = per_device_flops.get(device, 0.0) + flops
        for device, read in per_device_bytes.items():
            rate = self._device_read_rate(device)
            if device == CPU_DEVICE:
                flops_rate = hardware.cpu.physical_cores * CPU_FLOPS_PER_CORE
            else:
                flops_rate = hardware.gpus[device].memory_bandwidth_bytes_per_s * GPU_FLOPS_PER_BYTE_OF_BANDWIDTH
            seconds += max(read / rate, per_device_flops[device] / flops_rate)
        if pcie_bytes:
            seconds += pcie_bytes / (hardware.gpus[0].pcie_bandwidth_bytes_per_s * PCIE_EFFICIENCY)
        return seconds

    def predict(self, placement: _Placement, settings: _Settings) -> Prediction:
        step, reads = self.decode_step_seconds(placement, settings, settings.parallel)
        single, _ = self.decode_step_seconds(placement, settings, 1)
        prefill = settings.n_ubatch / self.prefill_seconds_per_ubatch(placement, settings)
        return Prediction(
            decode_tokens_per_s=settings.parallel / step,
            decode_tokens_per_s_single=1.0 / single,
            prefill_tokens_per_s=prefill,
            read_bytes_per_step=tuple(sorted((device_name(d), int(b)) for d, b in reads.items())),
        )

    # -- search --------------------------------------------------------------------------------------------
    def gpu_counts(self, n_on_gpu: int) -> tuple[int, ...]:
        """How many of the GPU-resident layers (output included) each GPU gets: in proportion to usable
        memory, as llama.cpp does by default with free memory (the plan states it in tensor_split)."""
        if self.n_gpus == 0 or n_on_gpu <= 0:
            return ()
        usable = [
            max(1, gpu.free_bytes - gpu_margin(gpu.total_bytes, self.request) - GPU_RUNTIME_OVERHEAD)
            for gpu in self.hardware.gpus
        ]
        total = sum(usable)
        counts = [n_on_gpu * u // total for u in usable]
        remainder = n_on_gpu - sum(counts)
        order = sorted(range(self.n_gpus), key=lambda g: n_on_gpu * usable[g] / total - counts[g], reverse=True)
        for g in order[:remainder]:
            counts[g] += 1
        return tuple(counts)

    def placement_for(self, n_gpu_layers: int, gpu_expert_layers: frozenset[int]) -> _Placement:
        """llama.cpp's layout for `n_gpu_layers`: the last layers (and the output, counted as one more layer)
        on the GPUs in contiguous runs, the output on the GPU holding the last run."""
        n_layer = self.shape.n_layer
        layer_devices = [CPU_DEVICE] * n_layer
        output_device = CPU_DEVICE
        if self.n_gpus and n_gpu_layers > 0:
            first = max(n_layer + 1 - n_gpu_layers, 0)
            position = first
            for gpu, count in enumerate(self.gpu_counts(n_layer + 1 - first)):
                for index in range(position, position + count):
                    if index < n_layer:
                        layer_devices[index] = gpu
                    else:
                        output_device = gpu
                position += count
        if self.shape.is_moe:
            expert_devices = tuple(layer_devices[i] if i in gpu_expert_layers else CPU_DEVICE for i in range(n_layer))
        else:
            expert_devices = tuple(layer_devices)
        return _Placement(tuple(layer_devices), expert_devices, output_device)

    @staticmethod
    def gpus_fit(evaluation: _Evaluation) -> bool:
        return all(d.free_bytes >= 0 for d in evaluation.devices if d.kind == "gpu")

    def most_layers_on_gpus(self, settings: _Settings) -> _Evaluation | None:
        """The placement with the most layers on the GPUs (routed experts in RAM) that fits the GPUs.

        GPU memory grows with every layer moved there. A binary search over n_gpu_layers runs on the compute
        buffers of the two extreme placements (the larger of each), then the answer is confirmed, and
        corrected one layer at a time, with the real compute buffers of the placements around it."""
        top = self.shape.n_layer + 1
        everything = self.evaluate(self.placement_for(top, frozenset()), settings)
        if self.gpus_fit(everything):
            return everything
        nothing = self.evaluate(self.placement_for(0, frozenset()), settings)
        if not self.gpus_fit(nothing):
            return None
        estimate = {
            device: max(everything_size, nothing.devices[device].compute_bytes if device >= 0 else 0)
            for device, everything_size in self.compute(everything.placement, settings).items()
        }
        low, high = 0, top
        while high - low > 1:
            middle = (low + high) // 2
            if self.gpus_fit(self.evaluate(self.placement_for(middle, frozenset()), settings, estimate)):
                low = middle
            else:
                high = middle
        best = self.evaluate(self.placement_for(low, frozenset()), settings) if low else nothing
        while low > 0 and not self.gpus_fit(best):
            low -= 1
            best = self.evaluate(self.placement_for(low, frozenset()), settings) if low else nothing
        while low + 1 < top:
            candidate = self.evaluate(self.placement_for(low + 1, frozenset()), settings)
            if not self.gpus_fit(candidate):
                break
            low, best = low + 1, candidate
        return best

    def expert_sizes_on_gpu(self, layer: int) -> int:
        return sum(cuda_tensor_bytes(t) for t in self._by_layer.get(layer, []) if t.kind == TensorKind.ROUTED_EXPERTS)

    def best_for_settings(self, settings: _Settings) -> _Evaluation | None:
        """The best placement for fixed KV type and batch sizes: as many layers on the GPUs as fit (their
        non-expert weights are read for every token), then the most routed-expert bytes that still fit."""
        shape = self.shape
        if self.n_gpus == 0:
            evaluation = self.evaluate(self.placement_for(0, frozenset()), settings)
            return evaluation if evaluation.fits else None
        base = self.most_layers_on_gpus(settings)
        if base is None:
            return None
        if not shape.is_moe:
            return base if base.fits else None
        n_gpu_layers = n_gpu_layers_of(base.placement)
        chosen: set[int] = set()
        for gpu in range(self.n_gpus):
            candidates = [
                (i, self.expert_sizes_on_gpu(i))
                for i in range(shape.n_layer)
                if base.placement.layer_devices[i] == gpu and shape.layers[i].expert_bytes
            ]
            chosen |= fill_knapsack(candidates, base.devices[gpu].free_bytes)
        evaluation = self.evaluate(self.placement_for(n_gpu_layers, frozenset(chosen)), settings)
        # compute buffers depend a little on what stays in RAM: shed expert layers until every GPU fits
        while not self.gpus_fit(evaluation) and chosen:
            over = {d.name for d in evaluation.devices if d.kind == "gpu" and d.free_bytes < 0}
            on_over = [i for i in chosen if device_name(evaluation.placement.layer_devices[i]) in over] or list(chosen)
            chosen.discard(min(on_over, key=lambda i: (shape.layers[i].expert_bytes, i)))
            evaluation = self.evaluate(self.placement_for(n_gpu_layers, frozenset(chosen)), settings)
        return evaluation if evaluation.fits else None


def n_gpu_layers_of(placement: _Placement) -> int:
    """llama.cpp's n_gpu_layers for a placement: GPU layers, plus one for the output layer."""
    on_gpu = sum(1 for device in placement.layer_devices if device != CPU_DEVICE)
    return on_gpu + (1 if placement.output_device != CPU_DEVICE else 0)


def fill_knapsack(candidates: list[tuple[int, int]], room: int) -> set[int]:
    """Indices of (index, size) items with the largest total size within `room`.

    Exact over classes of equal size (a MoE model has one or two expert-layer sizes); the search only
    stops exploring once more than three size classes remain, which keeps it instant."""
    groups: dict[int, list[int]] = {}
    for index, size in candidates:
        groups.setdefault(size, []).append(index)
    sizes = sorted(groups, reverse=True)
    best_total = 0
    best_counts: list[int] = []

    def search(position: int, remaining: int, counts: list[int], total: int) -> None:
        nonlocal best_total, best_counts
        if total > best_total:
            best_total, best_counts = total, counts.copy()
        if position == len(sizes):
            return
        size = sizes[position]
        most = min(len(groups[size]), remaining // size)
        for count in range(most, -1, -1):
            counts.append(count)
            search(position + 1, remaining - count * size, counts, total + count * size)
            counts.pop()
            if len(sizes) - position > 3:
                break

    if room > 0:
        search(0, room, [], 0)
    chosen: set[int] = set()
    for size, count in zip(sizes, best_counts, strict=False):
        if count:
            # the last layers first: which ones does not change the speed, and it keeps the CPU runs short
            chosen |= set(sorted(groups[size])[-count:])
    return chosen


# ---------------------------------------------------------------------------------------------------------
# The public entry point


def _kv_choices(shape: ModelShape, request: PlanRequest) -> list[KvType]:
    if request.kv_type is not None:
        return [request.kv_type]
    # quantized KV rows must hold whole 32-element blocks per head (llama.cpp refuses the context otherwise)
    quantizable = shape.head_dim_k % 32 == 0 and shape.head_dim_v % 32 == 0 and shape.n_attention_layers > 0
    return [KvType.F16, KvType.Q8_0] if quantizable else [KvType.F16]


def _ubatch_choices(request: PlanRequest, has_gpu: bool) -> list[int]:
    if request.n_ubatch is not None:
        return [request.n_ubatch]
    choices = list(UBATCH_CHOICES) if has_gpu else [UBATCH_CHOICES[0]]
    if request.n_batch is not None:
        choices = [u for u in choices if u <= request.n_batch] or [request.n_batch]
    return choices


def _ctx_choices(shape: ModelShape, request: PlanRequest) -> list[int]:
    if request.ctx is not None:
        return [request.ctx]
    ctx = min(shape.n_ctx_train, DEFAULT_MAX_CTX)
    choices = [ctx]
    while ctx // 2 >= MIN_DEFAULT_CTX:
        ctx //= 2
        choices.append(ctx)
    return choices


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.2f} GiB" if abs(n_bytes) >= GIB else f"{n_bytes / MIB:.0f} MiB"


def _search(planner: _Planner, ctx_choices: list[int]) -> list[_Evaluation]:
    """Best placement per (KV type, micro-batch) at the largest context choice where anything fits."""
    shape, request = planner.shape, planner.request
    for ctx in ctx_choices:
        evaluations: list[_Evaluation] = []
        for kv_type in _kv_choices(shape, request):
            for n_ubatch in _ubatch_choices(request, planner.n_gpus > 0):
                settings = _Settings(kv_type, n_ubatch, request.n_batch or n_ubatch, ctx, request.parallel)
                evaluation = planner.best_for_settings(settings)
                if evaluation is not None:
                    evaluations.append(evaluation)
        if evaluations:
            return evaluations
    return []


def plan(
    shape: ModelShape, hardware: HardwareProfile, request: PlanRequest, *, compute_cache: ComputeCache | None = None
) -> Plan:
    """The highest-scoring placement of `shape` on `hardware` for `request`; PlanError if nothing fits.

    compute_cache: shared between calls for the same `shape` only (the joint planner plans one model against
    many budgets); None keeps the cache to this call."""
    planner = _Planner(shape, hardware, request, compute_cache)
    ctx_choices = _ctx_choices(shape, request)
    evaluations = _search(planner, ctx_choices)
    tradeoffs: list[str] = []
    if not evaluations and hardware.gpus:
        # GPUs too small even for the compute buffer of prompt batches (llama.cpp copies RAM-resident weights
        # into it): everything on the CPU, with op_offload off so that nothing is copied to them
        cpu_only = _Planner(shape, replace(hardware, gpus=()), request, compute_cache)
        evaluations = _search(cpu_only, ctx_choices)
        if evaluations:
            planner = cpu_only
            tradeoffs.append("the GPUs are too small to help: everything runs on the CPU (op_offload off)")
    if not evaluations:
        raise DoesNotFitError(_shortfall_message(planner, ctx_choices[-1]))
    chosen, choice_tradeoffs = _choose(evaluations, request)
    tradeoffs += choice_tradeoffs
    if chosen.settings.ctx != ctx_choices[0]:
        tradeoffs.insert(
            0,
            f"context cut from {ctx_choices[0]} to {chosen.settings.ctx} tokens per slot to fit "
            f"(pass --ctx to insist on a size)",
        )
    return _to_plan(planner, chosen, tradeoffs, op_offload=planner.n_gpus == len(hardware.gpus))


def _gpu_weight_bytes(evaluation: _Evaluation) -> int:
    return sum(d.weights_bytes for d in evaluation.devices if d.kind == "gpu")


def _choose(evaluations: list[_Evaluation], request: PlanRequest) -> tuple[_Evaluation, list[str]]:
    """The best score, with two preferences that cost a little speed for robustness:

    - a quantized KV cache only when it buys a clear speed gain (>= 5%) by putting more weights on the
      GPU: it costs a little quality, so it is not used merely to read less when memory is plentiful;
    - the smallest micro-batch scoring within 2% of the best (a bigger one only costs memory)."""
    tradeoffs: list[str] = []
    pool = evaluations
    exact = [e for e in evaluations if e.settings.kv_type == KvType.F16]
    quantized = [e for e in evaluations if e.settings.kv_type != KvType.F16]
    if request.kv_type is None and exact and quantized:
        best_exact = max(exact, key=lambda e: e.score)
        best_quantized = max(quantized, key=lambda e: e.score)
        gain = best_quantized.score / best_exact.score - 1
        more_on_gpu = _gpu_weight_bytes(best_quantized) > _gpu_weight_bytes(best_exact)
        if gain >= KV_QUANTIZATION_MIN_GAIN and more_on_gpu:
            tradeoffs.append(_kv_tradeoff(best_quantized, best_exact))
            pool = quantized
        else:
            reason = "puts no more weights on a GPU" if not more_on_gpu else "gains under 5%"
            tradeoffs.append(
                f"kept the more precise f16 KV cache: {best_quantized.settings.kv_type} would score "
                f"{gain * 100:+.1f}% but {reason} (ask for it explicitly to use it)"
            )
            pool = exact
    best = max(pool, key=lambda e: e.score)
    same_kv = sorted(
        (e for e in pool if e.settings.kv_type == best.settings.kv_type), key=lambda e: e.settings.n_ubatch
    )
    chosen = next(e for e in same_kv if e.score >= best.score * (1 - UBATCH_SCORE_TOLERANCE))
    if chosen.settings.n_ubatch != same_kv[0].settings.n_ubatch:
        tradeoffs.append(_ubatch_tradeoff(chosen, same_kv[0]))
    return chosen, tradeoffs


def _gpu_expert_layers(evaluation: _Evaluation) -> int:
    placement = evaluation.placement
    return sum(1 for i, d in enumerate(placement.expert_devices) if d != CPU_DEVICE and placement.layer_devices[i] == d)


def _kv_tradeoff(chosen: _Evaluation, f16: _Evaluation) -> str:
    more = _gpu_expert_layers(chosen) - _gpu_expert_layers(f16)
    kv_saved = sum(d.kv_bytes for d in f16.devices) - sum(d.kv_bytes for d in chosen.devices)
    if more > 0:
        unit = "expert layers" if chosen.placement.expert_devices != chosen.placement.layer_devices else "layers"
        what = f"{more} more {unit} on the GPU"
    else:
        read_saved = sum(b for _, b in f16.prediction.read_bytes_per_step) - sum(
            b for _, b in chosen.prediction.read_bytes_per_step
        )
        what = f"{_gib(read_saved)} less read per decode step"
    return (
        f"KV cache {chosen.settings.kv_type} instead of f16: saves {_gib(kv_saved)}, {what}; decode "
        f"{f16.prediction.decode_tokens_per_s:.1f} -> {chosen.prediction.decode_tokens_per_s:.1f} tok/s"
    )


def _ubatch_tradeoff(chosen: _Evaluation, small: _Evaluation) -> str:
    extra = sum(d.compute_bytes for d in chosen.devices if d.kind == "gpu") - sum(
        d.compute_bytes for d in small.devices if d.kind == "gpu"
    )
    lost = _gpu_expert_layers(small) - _gpu_expert_layers(chosen)
    unit = "expert layers" if chosen.placement.expert_devices != chosen.placement.layer_devices else "layers"
    cost = f"{_gib(extra)} more GPU compute buffer" + (f" ({lost} fewer {unit} on the GPU)" if lost > 0 else "")
    return (
        f"micro-batch {chosen.settings.n_ubatch} instead of {small.settings.n_ubatch}: prefill "
        f"{small.prediction.prefill_tokens_per_s:.0f} -> {chosen.prediction.prefill_tokens_per_s:.0f} tok/s, "
        f"costs {cost}; decode {small.prediction.decode_tokens_per_s:.1f} -> "
        f"{chosen.prediction.decode_tokens_per_s:.1f} tok/s"
    )


def _shortfall_message(planner: _Planner, ctx: int) -> str:
    """What the smallest configuration needs against what the machine offers."""
    shape, request = planner.shape, planner.request
    settings = _Settings(
        kv_type=request.kv_type or min(_kv_choices(shape, request), key=lambda k: shape.kv_bytes_per_token(k)),
        n_ubatch=request.n_ubatch or UBATCH_CHOICES[0],
        n_batch=request.n_batch or request.n_ubatch or UBATCH_CHOICES[0],
        ctx=ctx,
        parallel=request.parallel,
    )
    n_gpu_layers = shape.n_layer + 1 if planner.n_gpus else 0
    everything = planner.evaluate(planner.placement_for(n_gpu_layers, frozenset(range(shape.n_layer))), settings)
    need = sum(d.total_bytes for d in everything.devices)
    offered = sum(max(d.budget_bytes, 0) for d in everything.devices)
    parts = (
        f"weights {_gib(sum(d.weights_bytes for d in everything.devices))}, "
        f"KV cache {_gib(sum(d.kv_bytes for d in everything.devices))} ({ctx} tokens x {request.parallel} "
        f"slot{'s' if request.parallel > 1 else ''}), "
        f"recurrent state {_gib(sum(d.recurrent_bytes for d in everything.devices))}, "
        f"compute {_gib(sum(d.compute_bytes for d in everything.devices))}, "
        f"runtime {_gib(sum(d.overhead_bytes for d in everything.devices))}"
    )
    budgets = " + ".join(f"{d.name} {_gib(max(d.budget_bytes, 0))}" for d in everything.devices)
    short = max(need - offered, 0)
    if short == 0:
        # enough memory in total, but not where it is needed (e.g. a single tensor larger than a GPU)
        worst = min(everything.devices, key=lambda d: d.free_bytes)
        short = -min(worst.free_bytes, 0) or need
        return (
            f"{shape.name} does not fit: no split of its {_gib(need)} ({parts}) fits the devices ({budgets}); "
            f"{worst.name} is {_gib(short)} short"
        )
    return (
        f"{shape.name} does not fit: it needs {_gib(need)} ({parts}) but the machine offers {_gib(offered)} "
        f"({budgets}): {_gib(short)} short. Use a smaller quantization, a shorter context, fewer slots, or "
        f"more memory."
    )


def _binding_constraint(planner: _Planner, evaluation: _Evaluation) -> str:
    shape, placement = planner.shape, evaluation.placement
    if planner.n_gpus == 0:
        cpu = evaluation.devices[-1]
        rate = planner._device_read_rate(CPU_DEVICE)
        return f"no GPU: each decode step reads everything from RAM at ~{rate / 1e9:.0f} GB/s ({cpu.name})"
    n_gpu_layers = n_gpu_layers_of(placement)
    gpu_devices = [d for d in evaluation.devices if d.kind == "gpu"]
    tightest = min(gpu_devices, key=lambda d: d.free_bytes)
    if n_gpu_layers < shape.n_layer + 1:
        return (
            f"{tightest.name} memory: {max(n_gpu_layers - 1, 0)} of {shape.n_layer} layers fit on the GPU "
            f"({_gib(tightest.free_bytes)} left)"
        )
    moe_layers = [layer.index for layer in shape.layers if layer.expert_bytes]
    on_gpu = [i for i in moe_layers if placement.expert_devices[i] != CPU_DEVICE]
    if len(on_gpu) < len(moe_layers):
        in_ram = [i for i in moe_layers if placement.expert_devices[i] == CPU_DEVICE]
        next_size = min(planner.expert_sizes_on_gpu(i) for i in in_ram)
        return (
            f"{tightest.name} memory: the routed experts of {len(on_gpu)} of {len(moe_layers)} layers fit on the "
            f"GPU; one more layer needs {_gib(next_size)}, {_gib(tightest.free_bytes)} is left"
        )
    cpu = evaluation.devices[-1]
    return (
        f"none: the whole model is on the GPU ({_gib(tightest.free_bytes)} left on {tightest.name}); "
        f"{cpu.name} only holds token_embd"
    )


def tensor_override_pattern(layers: list[int]) -> str:
    """One regex for the routed experts of `layers` (llama.cpp matches it with std::regex_search)."""
    alternatives = "|".join(str(i) for i in sorted(layers))
    return rf"^blk\.(?:{alternatives})\.ffn_(?:up|down|gate|gate_up)_(?:ch)?exps\."


def _to_plan(planner: _Planner, evaluation: _Evaluation, tradeoffs: list[str], op_offload: bool) -> Plan:
    shape, hardware, request = planner.shape, planner.hardware, planner.request
    placement, settings = evaluation.placement, evaluation.settings
    n_ctx_seq, n_ctx = context_sizes(settings.ctx, settings.parallel)
    n_gpu_layers = n_gpu_layers_of(placement)
    layers = []
    for layer in shape.layers:
        device = placement.layer_devices[layer.index]
        layers.append(
            LayerPlacement(
                index=layer.index,
                kind=layer.mixer_kind,
                device=device_name(device),
                experts_device=device_name(placement.expert_devices[layer.index]) if layer.expert_bytes else None,
                weights_bytes=layer.non_expert_bytes,
                expert_bytes=layer.expert_bytes,
            )
        )
    ram_experts = [
        layer.index
        for layer in shape.layers
        if layer.expert_bytes
        and placement.layer_devices[layer.index] != CPU_DEVICE
        and placement.expert_devices[layer.index] == CPU_DEVICE
    ]
    overrides = ((tensor_override_pattern(ram_experts), "CPU"),) if ram_experts else ()
    counts = [sum(1 for d in placement.layer_devices if d == gpu) for gpu in range(planner.n_gpus)]
    if placement.output_device != CPU_DEVICE:
        counts[placement.output_device] += 1
    tensor_split = tuple(float(c) for c in counts) if planner.n_gpus > 1 else ()
    cores = hardware.cpu.physical_cores
    snapshots = state_snapshot_bytes(shape, settings.ctx, settings.parallel, shape.kv_bytes_per_token(settings.kv_type))
    ram_left = max(0, evaluation.devices[-1].free_bytes - snapshots)  # the last device is the host
    return Plan(
        model=request.model_name or shape.name,
        architecture=shape.architecture,
        model_bytes=shape.total_bytes,
        devices=evaluation.devices,
        layers=tuple(layers),
        output_device=device_name(placement.output_device),
        n_gpu_layers=n_gpu_layers,
        tensor_split=tensor_split,
        tensor_overrides=overrides,
        ctx=settings.ctx,
        n_ctx_seq=n_ctx_seq,
        n_ctx=n_ctx,
        parallel=settings.parallel,
        kv_type=settings.kv_type,
        n_batch=settings.n_batch,
        n_ubatch=settings.n_ubatch,
        threads=cores,
        threads_batch=cores,
        use_mmap=True,
        use_mlock=request.use_mlock,
        use_extra_bufts=False,
        flash_attn="auto" if settings.kv_type == KvType.F16 else "on",
        op_offload=op_offload,
        predicted=evaluation.prediction,
        binding_constraint=_binding_constraint(planner, evaluation),
        tradeoffs=tuple(tradeoffs),
        score=evaluation.score,
        state_snapshot_bytes=snapshots,
        ram_left_bytes=ram_left,
        prompt_cache_bytes=prompt_cache_bytes_for(ram_left),
    )


def replan_with_margin(shape: ModelShape, hardware: HardwareProfile, request: PlanRequest, extra_bytes: int) -> Plan:
    """Plan again with every GPU's margin grown by `extra_bytes` (after a load that ran out of memory)."""
    margins = [gpu_margin(gpu.total_bytes, request) for gpu in hardware.gpus]
    return plan(shape, hardware, replace(request, gpu_margin_bytes=max(margins, default=0) + extra_bytes))
