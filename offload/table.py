"""The plan as a table a person reads (the CLI prints it; the server logs it with --auto-offload)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from offload.gguf_shape import ModelShape
from offload.hardware import GIB, MIB
from offload.joint import JointPlan
from offload.planner import Plan


def _size(n_bytes: float) -> str:
    if abs(n_bytes) >= GIB:
        return f"{n_bytes / GIB:.2f} GiB"
    if n_bytes == 0:
        return "0"
    return f"{n_bytes / MIB:.0f} MiB"


def _ranges(indices: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    parts: list[str] = []
    start = previous = None
    for index in sorted(indices):
        if start is None or previous is None:
            start = previous = index
        elif index == previous + 1:
            previous = index
        else:
            parts.append(f"{start}-{previous}" if previous != start else str(start))
            start = previous = index
    if start is not None and previous is not None:
        parts.append(f"{start}-{previous}" if previous != start else str(start))
    return ", ".join(parts) if parts else "none"


def render_table(result: Plan, shape: ModelShape) -> str:
    lines = [
        f"{result.model} ({result.architecture}, {_size(result.model_bytes)}, {shape.n_layer} layers)",
        f"context {result.ctx} tokens x {result.parallel} slot{'s' if result.parallel > 1 else ''} "
        f"(n_ctx {result.n_ctx}), KV cache {result.kv_type}, batch {result.n_batch} / micro-batch {result.n_ubatch}, "
        f"{result.threads} threads, {'mmap' if result.use_mmap else 'no mmap'}{', mlock' if result.use_mlock else ''}",
        "",
    ]
    header = ("device", "budget", "weights", "KV cache", "recurrent", "compute", "runtime", "total", "free")
    rows = [header] + [
        (
            d.name,
            _size(d.budget_bytes),
            _size(d.weights_bytes),
            _size(d.kv_bytes),
            _size(d.recurrent_bytes),
            _size(d.compute_bytes),
            _size(d.overhead_bytes),
            _size(d.total_bytes),
            _size(d.free_bytes),
        )
        for d in result.devices
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    snapshots = f" (after {_size(result.state_snapshot_bytes)} of prompt snapshots)" * bool(result.state_snapshot_bytes)
    lines.append(
        f"RAM left: {_size(result.ram_left_bytes)}{snapshots}; prompt cache {_size(result.prompt_cache_bytes)} "
        "(--prompt-cache-mib default)"
    )
    lines.append("")
    by_device: dict[str, list[int]] = {}
    for layer in result.layers:
        by_device.setdefault(layer.device, []).append(layer.index)
    mixer = "attention/SSM" if shape.has_recurrent_layers else "attention"
    rest = "norms, router, shared expert" if shape.is_moe else "norms, FFN"
    for device, indices in by_device.items():
        lines.append(f"layers {_ranges(indices)}: {mixer}, {rest} on {device}")
    expert_devices: dict[str, list[int]] = {}
    for layer in result.layers:
        if layer.experts_device is not None:
            expert_devices.setdefault(layer.experts_device, []).append(layer.index)
    for device, indices in expert_devices.items():
        lines.append(f"routed experts on {device}: layers {_ranges(indices)} ({len(indices)})")
    lines.append(f"output layer on {result.output_device}; token_embd on CPU")
    lines.append(
        f"n_gpu_layers {result.n_gpu_layers}"
        + (f", tensor_split {list(result.tensor_split)}" if result.tensor_split else "")
    )
    for pattern, device in result.tensor_overrides:
        lines.append(f"override: {pattern} -> {device}")
    lines.append("")
    predicted = result.predicted
    decode = f"decode {predicted.decode_tokens_per_s:.1f} tok/s"
    if result.parallel > 1:
        decode += f" with {result.parallel} slots ({predicted.decode_tokens_per_s_single:.1f} for one)"
    lines.append(f"predicted: {decode}, prefill {predicted.prefill_tokens_per_s:.0f} tok/s")
    lines.append(f"binding constraint: {result.binding_constraint}")
    for tradeoff in result.tradeoffs:
        lines.append(f"trade-off: {tradeoff}")
    return "\n".join(lines)


def render_joint_table(joint: JointPlan, shapes: Mapping[str, ModelShape]) -> str:
    """Several models in one server: bytes per model and device, the devices' totals, then each model's plan
    in brief (`shapes` by member name, for the layer counts)."""
    devices = [d.name for d in joint.devices]
    header = ("model", "weight", *devices)
    rows = [header]
    rows += [(m.name, f"{m.weight:g}", *(_size(m.bytes_on(d)) for d in devices)) for m in joint.members]
    rows.append(("total", "", *(_size(d.used_bytes) for d in joint.devices)))
    rows.append(("budget", "", *(_size(d.budget_bytes) for d in joint.devices)))
    rows.append(("free", "", *(_size(d.free_bytes) for d in joint.devices)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    verdict = "all fit" if joint.fits else f"{len(joint.problems)} left out"
    lines = [f"joint plan of {len(joint.members) + len(joint.problems)} models ({verdict})", ""]
    lines += ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    lines.append("(CPU includes each model's prompt snapshots and prompt cache)")
    for member in joint.members:
        result, shape = member.plan, shapes.get(member.name)
        n_layer = shape.n_layer if shape is not None else len(result.layers)
        experts = (
            f", routed experts of {result.gpu_expert_layers} layers on a GPU"
            if any(layer.experts_device is not None for layer in result.layers)
            else ""
        )
        lines += [
            "",
            f"{member.name}{' (kept as loaded)' if member.kept else ''}: n_gpu_layers {result.n_gpu_layers} of "
            f"{n_layer + 1}{experts}; context {result.ctx} x {result.parallel}, KV cache {result.kv_type}, "
            f"micro-batch {result.n_ubatch}",
            f"  predicted: decode {result.predicted.decode_tokens_per_s:.1f} tok/s, "
            f"prefill {result.predicted.prefill_tokens_per_s:.0f} tok/s; "
            f"prompt cache {_size(result.prompt_cache_bytes)}",
        ]
        lines += [f"  override: {pattern} -> {device}" for pattern, device in result.tensor_overrides]
    for problem in joint.problems:
        lines += ["", f"{problem.name}: {problem.reason}"]
    return "\n".join(lines)
