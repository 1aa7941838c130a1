"""Planning across this machine and llama.cpp RPC workers (other machines serving their memory and compute).

Pure: no I/O, no llama.cpp. The placement follows what llama.cpp can do with a layer split
(src/llama-model.cpp, load_tensors): the input embedding always stays on this machine's CPU, layers
[0, n_layer - n_gpu_layers) stay here too, and the last n_gpu_layers layers are split over the offload
devices in their registry order (RPC workers come first: llama_prepare_model_devices) in proportion to
tensor_split. n_gpu_layers counts the output layer as one, always the last offloaded one (i_gpu_start =
n_layer + 1 - n_gpu_layers): integer shares, the last worker's one larger, give each worker an exact,
contiguous range of whole layers, and a tensor override keeps the output layer's weights on this machine's
CPU anyway, so that the last worker sends back a hidden state, not n_vocab logits per token.

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
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from offload.gguf_shape import KvType, LayerShape, ModelShape
from offload.hardware import GIB, HardwareError, parse_size

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
class DeviceLayers:
    """One device's contiguous range of whole layers."""

    device: str  # "local", or the worker's name
    first_layer: int
    n_layers: int
    weight_bytes: int
    state_bytes: int  # KV cache and recurrent state of these layers, for every slot
    budget_bytes: int

    @property
    def used_bytes(self) -> int:
        return self.weight_bytes + self.state_bytes

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

    @property
    def n_worker_layers(self) -> int:
        return sum(worker.n_layers for worker in self.workers)

    @property
    def n_gpu_layers(self) -> int:
        """llama_model_params.n_gpu_layers: the workers' layers plus the output layer, which llama.cpp counts
        as the last one (its weights stay here: tensor_overrides)."""
        return self.n_worker_layers + 1 if self.n_worker_layers else 0

    @property
    def tensor_split(self) -> tuple[float, ...]:
        """llama_model_params.tensor_split: whole-layer counts per worker (the last worker with layers one more:
        the output layer's slot), which llama.cpp honours exactly."""
        if not self.n_worker_layers:
            return ()
        last = max(index for index, worker in enumerate(self.workers) if worker.n_layers)
        return tuple(float(worker.n_layers + (index == last)) for index, worker in enumerate(self.workers))

    @property
    def tensor_overrides(self) -> tuple[tuple[str, str], ...]:
        """Keep the output layer's weights on this machine's CPU (see the module docstring)."""
        return ((OUTPUT_TENSORS, "CPU"),) if self.n_worker_layers else ()

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
            "n_gpu_layers": self.n_gpu_layers,
            "tensor_split": list(self.tensor_split),
            "tensor_overrides": [list(item) for item in self.tensor_overrides],
            "traffic": [
                {"device": t.device, "bytes_per_token": t.bytes_per_token, "seconds_per_token": t.seconds_per_token}
                for t in self.traffic
            ],
            "traffic_bytes_per_token": self.traffic_bytes_per_token,
            "transfer_seconds_per_token": self.transfer_seconds_per_token,
        }

    def render(self) -> str:
        lines = [f"{'device':<24} {'layers':>9} {'weights':>10} {'KV+state':>10} {'budget':>10}"]
        for item in (self.local, *self.workers):
            span = f"{item.first_layer}-{item.first_layer + item.n_layers - 1}" if item.n_layers else "-"
            lines.append(
                f"{item.device:<24} {span:>9} {_mib(item.weight_bytes):>10} {_mib(item.state_bytes):>10} "
                f"{_mib(item.budget_bytes):>10}"
            )
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
) -> RpcPlan:
    """Whole layers over this machine (first) and the workers (in order), each within its budget.

    local_budget_bytes: what this machine's layers may take (the caller has taken off the embeddings, the
    output layer, compute buffers and its RAM margin). RpcPlanError when the layers fit nowhere."""
    costs = [layer_bytes(shape, layer, ctx, parallel, kv_type) for layer in shape.layers]
    sizes = [weights + state for weights, state in costs]
    budgets = [max(0, local_budget_bytes)] + [worker.budget_bytes for worker in workers]
    counts = _proportional_counts(sizes, budgets) or _greedy_counts(sizes, budgets)
    if counts is None:
        short = sum(sizes) - sum(budgets)
        raise RpcPlanError(
            f"the {shape.n_layer} layers need {_gib(sum(sizes))} (with {ctx} tokens x {parallel} slots of "
            f"{kv_type.value} KV); this machine and {len(workers)} worker(s) have {_gib(sum(budgets))} for them"
            + (f": {_gib(short)} short" if short > 0 else ": no split of whole layers fits")
        )
    names = ["local"] + [worker.name for worker in workers]
    placed: list[DeviceLayers] = []
    first = 0
    for name, count, budget in zip(names, counts, budgets, strict=True):
        span = costs[first : first + count]
        placed.append(
            DeviceLayers(name, first, count, sum(w for w, _ in span), sum(s for _, s in span), budget_bytes=budget)
        )
        first += count
    traffic = tuple(
        worker_traffic(shape, worker, shape.layers[item.first_layer : item.first_layer + item.n_layers], ctx)
        for worker, item in zip(workers, placed[1:], strict=True)
        if item.n_layers
    )
    return RpcPlan(n_layer=shape.n_layer, local=placed[0], workers=tuple(placed[1:]), traffic=traffic)


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
