"""Planning across this machine and llama.cpp RPC workers (other machines serving their memory and compute).

Pure: no I/O, no llama.cpp. The placement follows what llama.cpp can do with a layer split
(src/llama-model.cpp, load_tensors): the input embedding always stays on this machine's CPU, layers
[0, n_layer - n_gpu_layers) stay here too, and the last n_gpu_layers layers are split over the offload
devices in their registry order (RPC workers come first: llama_prepare_model_devices) in proportion to
tensor_split. n_gpu_layers counts the output layer as one, always the last offloaded one (i_gpu_start =
n_layer + 1 - n_gpu_layers): integer shares, the last worker's one larger, give each worker an exact,
contiguous range of whole layers, and a tensor override keeps the output layer's weights on this machine's
CPU anyway, so that the last worker sends back a hidden state, not n_vocab logits per token (with local GPUs,
below, the output's slot is on a GPU instead).

Traffic model, per token and per worker that holds layers (ggml_backend_sched copies split inputs between
backends; ggml-rpc copies tensors server-side only within one worker, so a hidden state from worker A to
worker B goes through this machine: ggml-rpc.cpp, ggml_backend_rpc_buffer_cpy_tensor):
- the hidden state in and out: 2 x n_embd x 4 bytes (f32 activations);
- its inputs: the token positions (4 bytes) and, where the worker holds attention layers, the attention mask:
  one f32 per KV position of the slot, so up to 4 x ctx bytes at a full context.
Each transfer is one message each way: 2 x latency per worker per decode step.

Placement policy: whole layers, contiguous, each device's share of the layers proportional to its budget
(memory left for layers, after margins), as llama.cpp's own default split by free memory does; every device
stays within its budget, or the plan says by how much the model does not fit.

Local GPUs (this machine's, after the workers in llama.cpp's device list: llama_prepare_model_devices appends
them) take the LAST layers, as many as fit their budgets, the last GPU first, and the layers before them are
split over the CPU and the workers as above. Why the last: llama.cpp fills model->devices in order after the
CPU's layers, so the GPUs can only hold the tail; a GPU is also the fastest device here and needs no network,
so it should hold as much as it can; and the device with the last slot holds the output layer, so the logits
are produced on this machine's GPU (no CPU override needed) instead of n_vocab floats coming back over the
network. The hidden state reaches the GPU from the last worker through this machine (the worker traffic model
is unchanged; the PCIe copy is not counted). A GPU that cannot hold even the output layer gets nothing: the
output stays on the CPU (the override again), and llama.cpp must not offload CPU-weight ops to it either
(op_offload off: the compute buffer that reserves on the GPU would not fit, see RpcPlan.op_offload).

With workers the placement is whole layers only: the single-machine planner's "routed experts in RAM" tensor
overrides (offload/planner.py) are not combined with RPC workers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from offload.compute import CPU_DEVICE, ComputeConfig, compute_buffer_sizes
from offload.gguf_shape import KvType, LayerShape, ModelShape, TensorKind
from offload.hardware import GIB, GpuInfo, HardwareError, parse_size
from offload.planner import GPU_RUNTIME_OVERHEAD, PlanRequest, context_sizes, cuda_tensor_bytes, gpu_margin

# The output layer's tensors (output.weight, or token_embd.weight where the model ties them; output_norm)
OUTPUT_TENSORS = r"^(output|output_norm|token_embd)\.weight$"
ACTIVATION_BYTES = 4  # f32 hidden states between devices
POSITION_BYTES = 4  # one int32 position per token
MASK_BYTES_PER_POSITION = 4  # one f32 per KV position (f16 with flash attention: counted as f32, an upper bound)
DEFAULT_LINK_BYTES_PER_S = 1e9 / 8  # 1 Gbit/s Ethernet, when nothing else is said or measured
DEFAULT_LATENCY_S = 0.5e-3
# Left free on a worker: its compute buffer and the runtime (the worker's ggml allocates its own compute
# buffers for the layers it holds), as a share of its free memory with a floor.
WORKER_MARGIN_FRACTION = 0.05
WORKER_MARGIN_MIN_BYTES = GIB // 4
DEFAULT_UBATCH = 512  # llama.cpp's n_ubatch default, and LlamaBackendConfig's
CPU = "CPU"  # where the output layer stays when no local GPU holds it

_PREFIXES = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
# bits: 10Gbit, 10Gbit/s, 10Gbps, 10Gb/s; bytes: 1.25GB/s (a capital B)
_LINK = re.compile(r"^\s*(?P<number>\d+(?:\.\d+)?)\s*(?P<prefix>[kKmMgGtT]?)(?P<unit>bit/s|bit|bps|b/s|B/s)\s*$")
_LATENCY = re.compile(r"^\s*(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>us|µs|ms|s)\s*$", re.IGNORECASE)


class RpcPlanError(ValueError):
    """The model does not fit this machine plus its workers; the message says by how much."""


@dataclass(frozen=True)
class RpcDevice:
    """A worker to plan for: measured at start (`--rpc`) or given by hand (`--rpc-device`)."""

    name: str  # the endpoint, or any label
    free_bytes: int
    bandwidth_bytes_s: float = DEFAULT_LINK_BYTES_PER_S  # the link to it, each direction
    latency_s: float = DEFAULT_LATENCY_S  # one message, one way

    @property
    def budget_bytes(self) -> int:
        """What its layers may take: free memory less a margin for its compute buffer and runtime."""
        margin = max(WORKER_MARGIN_MIN_BYTES, int(self.free_bytes * WORKER_MARGIN_FRACTION))
        return max(0, self.free_bytes - margin)


def parse_link(text: str) -> float:
    """'10Gbit', '1Gbit/s', '100Mbps', '1.25GB/s' → bytes per second; HardwareError otherwise."""
    match = _LINK.match(text)
    if match is None:
        raise HardwareError(f"cannot read link speed {text!r}: write it like 10Gbit, 1Gbit/s or 1.25GB/s")
    per_second = float(match.group("number")) * _PREFIXES[match.group("prefix").lower()]
    return per_second if match.group("unit") == "B/s" else per_second / 8


def parse_latency(text: str) -> float:
    """'0.3ms', '200us', '0.001s' → seconds; HardwareError otherwise."""
    match = _LATENCY.match(text)
    if match is None:
        raise HardwareError(f"cannot read latency {text!r}: write it like 0.3ms or 200us")
    scale = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}[match.group("unit").lower()]
    return float(match.group("number")) * scale


def parse_rpc_device(text: str) -> RpcDevice:
    """`NAME:SIZE[@LINK][+LATENCY]`, e.g. 'gpu-box:16GiB@10Gbit+0.2ms': a worker with SIZE free."""
    name, sep, rest = text.rpartition(":")
    if not sep or not name:
        raise HardwareError(f"cannot read RPC device {text!r}: write it like gpu-box:16GiB@10Gbit+0.2ms")
    rest, _, latency = rest.partition("+")
    size, _, link = rest.partition("@")
    return RpcDevice(
        name=name,
        free_bytes=parse_size(size),
        bandwidth_bytes_s=parse_link(link) if link else DEFAULT_LINK_BYTES_PER_S,
        latency_s=parse_latency(latency) if latency else DEFAULT_LATENCY_S,
    )


@dataclass(frozen=True)
class LocalGpu:
    """One of this machine's GPUs to plan for, in llama.cpp's registry order (local_gpu sizes it)."""

    name: str  # llama.cpp's device name: CUDA0, CUDA1, ...
    budget_bytes: int  # what its layers may take (weights as CUDA pads them, KV and recurrent state)
    # What holding the output layer costs on top: its weights here (llama.cpp copies them to the output
    # device), and how much larger the compute buffer gets where the logits are produced
    output_weight_bytes: int = 0
    output_compute_bytes: int = 0

    @property
    def output_bytes(self) -> int:
        return self.output_weight_bytes + self.output_compute_bytes


@dataclass(frozen=True)
class DeviceLayers:
    """One device's contiguous range of whole layers."""

    device: str  # "local", a worker's name, or a local GPU's name
    first_layer: int
    n_layers: int
    weight_bytes: int
    state_bytes: int  # KV cache and recurrent state of these layers, for every slot
    budget_bytes: int
    output_bytes: int = 0  # on the local GPU that holds the output layer: LocalGpu.output_bytes

    @property
    def used_bytes(self) -> int:
        return self.weight_bytes + self.state_bytes + self.output_bytes

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.first_layer + self.n_layers)


@dataclass(frozen=True)
class WorkerTraffic:
    device: str
    bytes_per_token: int
    seconds_per_token: float  # transfer time at its link speed, plus latency, per decode step of one token


@dataclass(frozen=True)
class RpcPlan:
    n_layer: int
    local: DeviceLayers
    workers: tuple[DeviceLayers, ...]  # in registry order (the order llama.cpp fills them in)
    traffic: tuple[WorkerTraffic, ...]  # one per worker that holds layers
    gpus: tuple[DeviceLayers, ...] = ()  # this machine's GPUs, in registry order, after the workers
    output_device: str = CPU  # the local GPU that holds the output layer, or CPU

    @property
    def n_worker_layers(self) -> int:
        return sum(worker.n_layers for worker in self.workers)

    @property
    def n_local_gpu_layers(self) -> int:
        return sum(gpu.n_layers for gpu in self.gpus)

    @property
    def output_on_gpu(self) -> bool:
        return self.output_device != CPU

    @property
    def n_gpu_layers(self) -> int:
        """llama_model_params.n_gpu_layers: the workers' and local GPUs' layers plus the output layer, which
        llama.cpp counts as the last one (on a local GPU, or on the last worker with its weights kept here by
        tensor_overrides)."""
        n_offloaded = self.n_worker_layers + self.n_local_gpu_layers
        return n_offloaded + 1 if n_offloaded or self.output_on_gpu else 0

    @property
    def tensor_split(self) -> tuple[float, ...]:
        """llama_model_params.tensor_split, one entry per device of llama.cpp's model->devices (workers, then
        local GPUs): whole-layer counts, the device with the output layer's slot one more (the local GPU that
        holds it, else the last worker with layers), which llama.cpp honours exactly."""
        if not self.n_gpu_layers:
            return ()
        devices = (*self.workers, *self.gpus)
        if self.output_on_gpu:
            last = len(self.workers) + [gpu.device for gpu in self.gpus].index(self.output_device)
        else:
            last = max(index for index, worker in enumerate(self.workers) if worker.n_layers)
        return tuple(float(device.n_layers + (index == last)) for index, device in enumerate(devices))

    @property
    def tensor_overrides(self) -> tuple[tuple[str, str], ...]:
        """Keep the output layer's weights on this machine's CPU when its slot is on a worker (see the module
        docstring); none when a local GPU holds it."""
        return ((OUTPUT_TENSORS, CPU),) if self.n_gpu_layers and not self.output_on_gpu else ()

    @property
    def op_offload(self) -> bool:
        """Whether llama.cpp may run ops on CPU-resident weights on the local GPUs (llama_context_params.
        op_offload): not when there are local GPUs but none could hold even the output layer, since the
        weight copies it would reserve a compute buffer for do not fit them either."""
        return not self.gpus or self.output_on_gpu

    @property
    def traffic_bytes_per_token(self) -> int:
        return sum(item.bytes_per_token for item in self.traffic)

    @property
    def transfer_seconds_per_token(self) -> float:
        return sum(item.seconds_per_token for item in self.traffic)

    def to_json(self) -> dict[str, Any]:
        def device_json(item: DeviceLayers) -> dict[str, Any]:
            return {
                "device": item.device,
                "first_layer": item.first_layer,
                "n_layers": item.n_layers,
                "weight_bytes": item.weight_bytes,
                "state_bytes": item.state_bytes,
                "budget_bytes": item.budget_bytes,
            }

        return {
            "n_layer": self.n_layer,
            "local": device_json(self.local),
            "workers": [device_json(worker) for worker in self.workers],
            "gpus": [{**device_json(gpu), "output_bytes": gpu.output_bytes} for gpu in self.gpus],
            "output_device": self.output_device,
            "n_gpu_layers": self.n_gpu_layers,
            "tensor_split": list(self.tensor_split),
            "tensor_overrides": [list(item) for item in self.tensor_overrides],
            "op_offload": self.op_offload,
            "traffic": [
                {"device": t.device, "bytes_per_token": t.bytes_per_token, "seconds_per_token": t.seconds_per_token}
                for t in self.traffic
            ],
            "traffic_bytes_per_token": self.traffic_bytes_per_token,
            "transfer_seconds_per_token": self.transfer_seconds_per_token,
        }

    def render(self) -> str:
        lines = [f"{'device':<24} {'layers':>9} {'weights':>10} {'KV+state':>10} {'budget':>10}"]
        for item in (self.local, *self.workers, *self.gpus):
            span = f"{item.first_layer}-{item.first_layer + item.n_layers - 1}" if item.n_layers else "-"
            lines.append(
                f"{item.device:<24} {span:>9} {_mib(item.weight_bytes):>10} {_mib(item.state_bytes):>10} "
                f"{_mib(item.budget_bytes):>10}"
            )
        if self.gpus:
            output = next((gpu for gpu in self.gpus if gpu.device == self.output_device), None)
            held = f" ({_mib(output.output_bytes)} of its budget)" if output else ""
            lines.append(f"output layer: {self.output_device}{held}")
        lines.append(
            f"network per token: {self.traffic_bytes_per_token} bytes, "
            f"{self.transfer_seconds_per_token * 1e3:.2f} ms of transfers and latency"
        )
        return "\n".join(lines)


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


def layer_bytes(shape: ModelShape, layer: LayerShape, ctx: int, parallel: int, kv_type: KvType) -> tuple[int, int]:
    """(weights, KV cache + recurrent state for `parallel` slots of `ctx` tokens) of one layer."""
    state = shape.kv_bytes_per_token_of_layer(layer, kv_type) * ctx * parallel
    if layer.is_recurrent:
        state += shape.recurrent_bytes_per_sequence_of_layer(layer) * parallel
    return layer.total_bytes, state


def gpu_layer_bytes(shape: ModelShape, ctx: int, parallel: int, kv_type: KvType) -> list[tuple[int, int]]:
    """(weights, KV cache + recurrent state) of each layer on a CUDA GPU: its weights as a CUDA buffer holds
    them (offload/planner.py cuda_tensor_bytes: quantized rows padded, tensors aligned)."""
    weights = [0] * shape.n_layer
    for tensor in shape.tensors:
        if tensor.layer is not None and tensor.layer < shape.n_layer:
            weights[tensor.layer] += cuda_tensor_bytes(tensor)
    return [(weights[layer.index], layer_bytes(shape, layer, ctx, parallel, kv_type)[1]) for layer in shape.layers]


def output_weight_bytes_on_gpu(shape: ModelShape) -> int:
    """The output layer's weights on the GPU that holds it: output.weight and output_norm, or, where the model
    ties its embeddings, token_embd again (llama-model-loader.cpp TENSOR_DUPLICATED: token_embd itself stays
    on the CPU)."""
    tied = not any(tensor.name == "output.weight" for tensor in shape.tensors)
    return sum(
        cuda_tensor_bytes(tensor)
        for tensor in shape.tensors
        if tensor.kind == TensorKind.OUTPUT or (tied and tensor.kind == TensorKind.EMBEDDING)
    )


def local_gpu(
    name: str,
    gpu: GpuInfo,
    shape: ModelShape,
    *,
    ctx: int,
    parallel: int = 1,
    kv_type: KvType = KvType.F16,
    n_ubatch: int = DEFAULT_UBATCH,
    n_batch: int | None = None,
    flash_attn: bool = True,
    margin_bytes: int | None = None,
) -> LocalGpu:
    """A local GPU's budget for layers, and what holding the output layer costs on it. The budget is

    - its free memory (as llama.cpp's registry, or NVML, reports it now),
    - less gpu_margin(total) (offload/planner.py: max(256 MiB, 2% of the GPU), or --gpu-margin: left to the
      rest of the machine),
    - less GPU_RUNTIME_OVERHEAD (offload/planner.py: the CUDA context, cuBLAS workspace and llama.cpp's memory
      pool, which llama.cpp's own buffer sizes do not show),
    - less its compute buffer, replayed from llama.cpp's graph reservation (offload/compute.py
      compute_buffer_sizes) for this GPU holding the last layer(s) with every other layer on the CPU. That
      buffer is the same for any partial range of layers (the graph allocator reuses memory across layers;
      with op_offload the largest CPU-resident weight is copied in for prompt batches), and smaller only
      when the GPU holds every layer: an upper bound, which also counts the workers' layers as CPU ones.
    The output layer (the last GPU with room holds it) costs output_weight_bytes_on_gpu plus the growth of
    that compute buffer when the logits are produced here (n_vocab floats per output row), LocalGpu.output_bytes.
    """
    n_ctx_seq, _ = context_sizes(ctx, parallel)
    n_layer = shape.n_layer

    def compute_bytes(holds_output: bool) -> int:
        # device 0 is this GPU with the last layer; without the output, a next GPU (device 1) holds it
        devices = [CPU_DEVICE] * n_layer
        if holds_output or n_layer < 2:
            devices[-1] = 0
        else:
            devices[-2:] = [0, 1]
        config = ComputeConfig(
            n_ctx_seq=n_ctx_seq,
            n_seq=parallel,
            n_ubatch=n_ubatch,
            n_batch=n_batch or n_ubatch,
            kv_type=kv_type,
            flash_attn=flash_attn,
            layer_devices=tuple(devices),
            output_device=0 if holds_output else 1,
            n_gpus=1 if holds_output else 2,
        )
        return compute_buffer_sizes(shape, config).get(0, 0)

    without_output = compute_bytes(holds_output=False)
    margin = gpu_margin(gpu.total_bytes, PlanRequest(gpu_margin_bytes=margin_bytes))
    return LocalGpu(
        name=name,
        budget_bytes=max(0, gpu.free_bytes - margin - GPU_RUNTIME_OVERHEAD - without_output),
        output_weight_bytes=output_weight_bytes_on_gpu(shape),
        output_compute_bytes=max(0, compute_bytes(holds_output=True) - without_output),
    )


def worker_traffic(shape: ModelShape, worker: RpcDevice, layers: Sequence[LayerShape], ctx: int) -> WorkerTraffic:
    """What one decoded token sends to and from a worker that holds `layers` (see the module docstring)."""
    n_bytes = 2 * shape.n_embd * ACTIVATION_BYTES + POSITION_BYTES
    if any(layer.has_kv for layer in layers):
        n_bytes += MASK_BYTES_PER_POSITION * ctx
    seconds = n_bytes / worker.bandwidth_bytes_s + 2 * worker.latency_s
    return WorkerTraffic(worker.name, n_bytes, seconds)


def plan_rpc(
    shape: ModelShape,
    workers: Sequence[RpcDevice],
    *,
    local_budget_bytes: int,
    ctx: int,
    parallel: int = 1,
    kv_type: KvType = KvType.F16,
    gpus: Sequence[LocalGpu] = (),
) -> RpcPlan:
    """Whole layers over this machine (first), the workers (in order) and this machine's GPUs (last, in order),
    each within its budget.

    local_budget_bytes: what this machine's layers may take (the caller has taken off the embeddings, the
    output layer, compute buffers and its RAM margin). gpus: this machine's GPUs (local_gpu), in llama.cpp's
    registry order; they take the last layers (module docstring). RpcPlanError when the layers fit nowhere."""
    costs = [layer_bytes(shape, layer, ctx, parallel, kv_type) for layer in shape.layers]
    gpu_costs = gpu_layer_bytes(shape, ctx, parallel, kv_type) if gpus else []
    gpu_counts, output_gpu = _gpu_counts([weights + state for weights, state in gpu_costs], gpus)
    n_rest = shape.n_layer - sum(gpu_counts)  # the layers before the GPUs' ones: the CPU's and the workers'
    sizes = [weights + state for weights, state in costs[:n_rest]]
    budgets = [max(0, local_budget_bytes)] + [worker.budget_bytes for worker in workers]
    counts = _proportional_counts(sizes, budgets) or _greedy_counts(sizes, budgets)
    if counts is None:
        raise RpcPlanError(_does_not_fit(shape, workers, costs, gpu_counts, budgets, ctx, parallel, kv_type))
    names = ["local"] + [worker.name for worker in workers]
    placed: list[DeviceLayers] = []
    first = 0
    for name, count, budget in zip(names, counts, budgets, strict=True):
        span = costs[first : first + count]
        placed.append(
            DeviceLayers(name, first, count, sum(w for w, _ in span), sum(s for _, s in span), budget_bytes=budget)
        )
        first += count
    on_gpus: list[DeviceLayers] = []
    for index, (gpu, count) in enumerate(zip(gpus, gpu_counts, strict=True)):
        span = gpu_costs[first : first + count]
        output_bytes = gpu.output_bytes if index == output_gpu else 0
        weights, state = sum(w for w, _ in span), sum(s for _, s in span)
        on_gpus.append(DeviceLayers(gpu.name, first, count, weights, state, gpu.budget_bytes, output_bytes))
        first += count
    traffic = tuple(
        worker_traffic(shape, worker, shape.layers[item.first_layer : item.first_layer + item.n_layers], ctx)
        for worker, item in zip(workers, placed[1:], strict=True)
        if item.n_layers
    )
    return RpcPlan(
        n_layer=shape.n_layer,
        local=placed[0],
        workers=tuple(placed[1:]),
        traffic=traffic,
        gpus=tuple(on_gpus),
        output_device=gpus[output_gpu].name if output_gpu is not None else CPU,
    )


def _gpu_counts(sizes: Sequence[int], gpus: Sequence[LocalGpu]) -> tuple[list[int], int | None]:
    """How many of the last layers each GPU takes, and which GPU holds the output layer (None: the CPU).

    From the last GPU back: the first one with room for the output layer holds it (a GPU after it could only
    hold layers followed by the output, so it gets none); then each GPU takes layers from the end back while
    they fit its budget."""
    counts = [0] * len(gpus)
    output_gpu: int | None = None
    end = len(sizes)
    for index in reversed(range(len(gpus))):
        budget = gpus[index].budget_bytes
        if output_gpu is None:
            if budget < gpus[index].output_bytes:
                continue
            output_gpu, budget = index, budget - gpus[index].output_bytes
        used = 0
        while counts[index] < end and used + sizes[end - 1 - counts[index]] <= budget:
            used += sizes[end - 1 - counts[index]]
            counts[index] += 1
        end -= counts[index]
    return counts, output_gpu


def _does_not_fit(
    shape: ModelShape,
    workers: Sequence[RpcDevice],
    costs: Sequence[tuple[int, int]],
    gpu_counts: Sequence[int],
    budgets: Sequence[int],
    ctx: int,
    parallel: int,
    kv_type: KvType,
) -> str:
    """Why no split fits, with the numbers: what the layers need and what the devices have for them."""
    n_on_gpus = sum(gpu_counts)
    rest = sum(weights + state for weights, state in costs[: shape.n_layer - n_on_gpus])
    short = rest - sum(budgets)
    needs = (
        f"the {shape.n_layer} layers need {_gib(sum(w + s for w, s in costs))} (with {ctx} tokens x {parallel} "
        f"slots of {kv_type.value} KV)"
    )
    if gpu_counts:
        needs += (
            f"; the {len(gpu_counts)} local GPU(s) take the last {n_on_gpus}, the other "
            f"{shape.n_layer - n_on_gpus} need {_gib(rest)}"
        )
    return f"{needs}; this machine and {len(workers)} worker(s) have {_gib(sum(budgets))} for them" + (
        f": {_gib(short)} short" if short > 0 else ": no split of whole layers fits"
    )


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / GIB:.2f} GiB"


def _proportional_counts(sizes: Sequence[int], budgets: Sequence[int]) -> list[int] | None:
    """Contiguous runs, each device's bytes close to its budget's share of the total; None if one overflows."""
    total_budget = sum(budgets)
    if total_budget <= 0:
        return None
    total = sum(sizes)
    counts: list[int] = []
    start = 0
    for index, budget in enumerate(budgets):
        if index == len(budgets) - 1:
            count = len(sizes) - start
        else:
            target = total * budget / total_budget
            count, used = 0, 0
            # take the next layer while it brings the device closer to its target, within its budget
            while start + count < len(sizes) and used + sizes[start + count] <= budget:
                size = sizes[start + count]
                if used + size / 2 > target:
                    break
                used += size
                count += 1
        if sum(sizes[start : start + count]) > budget:
            return None
        counts.append(count)
        start += count
    return counts


def _greedy_counts(sizes: Sequence[int], budgets: Sequence[int]) -> list[int] | None:
    """Each device in order takes as many layers as fit; None if layers are left over."""
    counts: list[int] = []
    start = 0
    for budget in budgets:
        count, used = 0, 0
        while start + count < len(sizes) and used + sizes[start + count] <= budget:
            used += sizes[start + count]
            count += 1
        counts.append(count)
        start += count
    return counts if start == len(sizes) else None


def local_budget_of(shape: ModelShape, ram_available_bytes: int, ram_margin_bytes: int) -> int:
    """RAM this machine's layers may take: available less the margin, the input embedding and the output
    layer (both always stay on this machine)."""
    return ram_available_bytes - ram_margin_bytes - shape.embedding_bytes - shape.output_bytes


def default_ctx(shape: ModelShape) -> int:
    """The context per slot planned when none is asked for: the training context, at most 8192."""
    return min(shape.n_ctx_train or 8192, 8192)
