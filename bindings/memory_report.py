"""What llama.cpp says it allocated while loading a model, parsed from its log."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class MemoryReport:
    """Bytes llama.cpp said it allocated while loading, read from its log (printed in MiB, 2 decimals).

    model_bytes: weights per buffer name ("CPU_Mapped", "CPU_REPACK", "CUDA0", "CUDA_Host", ...).
    kv_cache_bytes / recurrent_state_bytes / compute_bytes / output_bytes: per buffer or device name.
    """

    model_bytes: Mapping[str, int]
    kv_cache_bytes: Mapping[str, int]
    recurrent_state_bytes: Mapping[str, int]
    compute_bytes: Mapping[str, int]
    output_bytes: Mapping[str, int]

    @property
    def total_bytes(self) -> int:
        parts = (self.model_bytes, self.kv_cache_bytes, self.recurrent_state_bytes, self.compute_bytes)
        return sum(sum(part.values()) for part in (*parts, self.output_bytes))


_MEMORY_LINE = re.compile(
    r"^\S+:\s+(?P<name>\S+)\s+(?P<kind>model|KV|RS|compute|output) buffer size\s*=\s*(?P<mib>[\d.]+) MiB"
)
_COMPUTE_RESERVE_LINE = re.compile(r"^sched_reserve: reserving \.\.\.")


def parse_memory_report(log_lines: Sequence[str]) -> MemoryReport:
    """Turn llama.cpp's load-time log lines into a MemoryReport.

    Several buffers of one kind and name add up (e.g. the KV caches of an iSWA model, mmap'd shards).
    The compute buffers are reserved again whenever the graph changes; the last reservation counts.
    """
    sums: dict[str, dict[str, int]] = {kind: {} for kind in ("model", "KV", "RS", "output")}
    compute: dict[str, int] = {}
    for line in log_lines:
        if _COMPUTE_RESERVE_LINE.match(line):
            compute = {}
            continue
        match = _MEMORY_LINE.match(line)
        if match is None:
            continue
        n_bytes = round(float(match["mib"]) * 1024 * 1024)
        if match["kind"] == "compute":
            compute[match["name"]] = n_bytes
        else:
            per_name = sums[match["kind"]]
            per_name[match["name"]] = per_name.get(match["name"], 0) + n_bytes
    return MemoryReport(
        model_bytes=MappingProxyType(sums["model"]),
        kv_cache_bytes=MappingProxyType(sums["KV"]),
        recurrent_state_bytes=MappingProxyType(sums["RS"]),
        compute_bytes=MappingProxyType(compute),
        output_bytes=MappingProxyType(sums["output"]),
    )
