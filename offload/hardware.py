"""What the machine has: GPUs (pynvml), RAM and CPU (psutil, /proc/cpuinfo), and a measured RAM bandwidth.

`detect()` is the only impure function of the planner. The measured RAM bandwidth is the one slow part
(~0.3 s), so it is cached in ~/.cache/qwen3-local/hardware.json, keyed by CPU model, cores and RAM size; free
memory is always read fresh. `with_overrides()` plans for another machine: `--gpu 16GiB --ram 120GiB`,
several `--gpu`, or `--gpu none`.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

KIB = 1024
MIB = 1024**2
GIB = 1024**3

# PCIe payload bandwidth per lane and direction, bytes/s, after line encoding (8b/10b for gen 1-2, 128b/130b
# for gen 3+).
PCIE_LANE_BYTES_PER_S = {1: 0.25e9, 2: 0.5e9, 3: 0.985e9, 4: 1.969e9, 5: 3.938e9, 6: 7.563e9}

# Assumed for a GPU given only by size (`--gpu 16GiB`): a 16 GB card of the RTX A4000 / RTX 4070 Ti Super class
# on PCIe 4.0 x16. `--gpu 16GiB@717GB/s` states the bandwidth.
DEFAULT_GPU_BANDWIDTH_BYTES_PER_S = 448e9
DEFAULT_PCIE_GENERATION = 4
DEFAULT_PCIE_WIDTH = 16
# Assumed for `--ram N` when planning for another machine: dual-channel DDR5-4800 (2 x 38.4 GB/s).
DEFAULT_RAM_BANDWIDTH_BYTES_PER_S = 76.8e9

BANDWIDTH_PROBE_BYTES_PER_THREAD = 64 * MIB
BANDWIDTH_PROBE_REPEATS = 3
CACHE_FILE_NAME = "hardware.json"


class HardwareError(ValueError):
    """A hardware override could not be understood; the message says which and why."""


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as llama.cpp's CUDA backend will see it (CUDA0, CUDA1, ... in this order)."""

    name: str
    total_bytes: int
    free_bytes: int
    memory_bandwidth_bytes_per_s: float
    pcie_generation: int
    pcie_width: int

    @property
    def pcie_bandwidth_bytes_per_s(self) -> float:
        per_lane = PCIE_LANE_BYTES_PER_S.get(self.pcie_generation, PCIE_LANE_BYTES_PER_S[DEFAULT_PCIE_GENERATION])
        return per_lane * self.pcie_width


@dataclass(frozen=True)
class CpuInfo:
    model: str
    physical_cores: int
    logical_cores: int
    flags: frozenset[str]

    @property
    def has_amx(self) -> bool:
        # llama.cpp's AMX path crashes on the first quantized decode (see shared/notes/llama-cpp-facts.md)
        return any(flag.startswith("amx") for flag in self.flags)

    @property
    def has_avx512(self) -> bool:
        return "avx512f" in self.flags


@dataclass(frozen=True)
class HardwareProfile:
    """A machine to plan for: detected, overridden, or written by hand in tests."""

    gpus: tuple[GpuInfo, ...]
    cpu: CpuInfo
    ram_total_bytes: int
    ram_available_bytes: int
    ram_bandwidth_bytes_per_s: float
    overrides: tuple[str, ...] = ()  # what was set by hand ("gpu", "ram", "cores"), for display

    def to_json(self) -> dict[str, Any]:
        return {
            "gpus": [
                {
                    "name": gpu.name,
                    "total_bytes": gpu.total_bytes,
                    "free_bytes": gpu.free_bytes,
                    "memory_bandwidth_bytes_per_s": gpu.memory_bandwidth_bytes_per_s,
                    "pcie_generation": gpu.pcie_generation,
                    "pcie_width": gpu.pcie_width,
                }
                for gpu in self.gpus
            ],
            "cpu": {
                "model": self.cpu.model,
                "physical_cores": self.cpu.physical_cores,
                "logical_cores": self.cpu.logical_cores,
                "has_amx": self.cpu.has_amx,
            },
            "ram_total_bytes": self.ram_total_bytes,
            "ram_available_bytes": self.ram_available_bytes,
            "ram_bandwidth_bytes_per_s": self.ram_bandwidth_bytes_per_s,
            "overrides": list(self.overrides),
        }


# ---------------------------------------------------------------------------------------------------------
# Parsing sizes and overrides

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": KIB,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": MIB,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": GIB,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """'16GiB' -> 17179869184, '24GB' -> 24000000000, '512M' -> 512000000; raises HardwareError."""
    match = _SIZE.match(text)
    unit = match.group("unit").lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise HardwareError(f"cannot read size {text!r}: write it like 16GiB, 24GB or 512MiB")
    return int(float(match.group("number")) * _SIZE_UNITS[unit])


def parse_bandwidth(text: str) -> float:
    """'448GB/s' -> 448e9 bytes/s."""
    body = text.strip()
    if not body.lower().endswith("/s"):
        raise HardwareError(f"cannot read bandwidth {text!r}: write it like 448GB/s")
    return float(parse_size(body[:-2]))


def parse_gpu_spec(text: str, index: int) -> GpuInfo:
    """`SIZE[@BANDWIDTH]`, e.g. '16GiB' or '24GB@1008GB/s'. The whole size counts as free."""
    size_text, _, bandwidth_text = text.partition("@")
    size = parse_size(size_text)
    if size <= 0:
        raise HardwareError(f"GPU size must be positive, got {text!r}")
    bandwidth = parse_bandwidth(bandwidth_text) if bandwidth_text else DEFAULT_GPU_BANDWIDTH_BYTES_PER_S
    return GpuInfo(
        name=f"GPU {index} ({size_text.strip()})",
        total_bytes=size,
        free_bytes=size,
        memory_bandwidth_bytes_per_s=bandwidth,
        pcie_generation=DEFAULT_PCIE_GENERATION,
        pcie_width=DEFAULT_PCIE_WIDTH,
    )


def with_overrides(
    profile: HardwareProfile,
    gpus: Sequence[str] | None = None,
    ram: str | None = None,
    cores: int | None = None,
) -> HardwareProfile:
    """Replace parts of a profile: `gpus` (each 'SIZE[@BW]', or ['none']), `ram` ('SIZE[@BW]'), CPU cores."""
    changed = list(profile.overrides)
    if gpus is not None:
        if [g.strip().lower() for g in gpus] == ["none"]:
            new_gpus: tuple[GpuInfo, ...] = ()
        elif any(g.strip().lower() == "none" for g in gpus):
            raise HardwareError("--gpu none cannot be combined with other --gpu values")
        else:
            new_gpus = tuple(parse_gpu_spec(spec, i) for i, spec in enumerate(gpus))
        profile = replace(profile, gpus=new_gpus)
        changed.append("gpu")
    if ram is not None:
        size_text, _, bandwidth_text = ram.partition("@")
        size = parse_size(size_text)
        if size <= 0:
            raise HardwareError(f"RAM size must be positive, got {ram!r}")
        bandwidth = parse_bandwidth(bandwidth_text) if bandwidth_text else profile.ram_bandwidth_bytes_per_s
        profile = replace(profile, ram_total_bytes=size, ram_available_bytes=size, ram_bandwidth_bytes_per_s=bandwidth)
        changed.append("ram")
    if cores is not None:
        if cores <= 0:
            raise HardwareError(f"CPU cores must be positive, got {cores}")
        profile = replace(profile, cpu=replace(profile.cpu, physical_cores=cores, logical_cores=max(cores, 1)))
        changed.append("cores")
    return replace(profile, overrides=tuple(dict.fromkeys(changed)))


# ---------------------------------------------------------------------------------------------------------
# Detection (impure)


def default_cache_path() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qwen3-local" / CACHE_FILE_NAME


def detect(cache_path: Path | None = None, refresh: bool = False, with_gpus: bool = True) -> HardwareProfile:
    """Probe this machine. The RAM bandwidth measurement is cached at `cache_path` unless `refresh`.

    with_gpus=False ignores the GPUs: pass llama.cpp's llama_supports_gpu_offload() so that a CPU-only build
    is never planned onto a GPU it cannot use."""
    import psutil

    cpu = _detect_cpu()
    memory = psutil.virtual_memory()
    cache_key = f"{cpu.model}|{cpu.physical_cores}|{cpu.logical_cores}|{memory.total}"
    path = cache_path or default_cache_path()
    bandwidth = None if refresh else _cached_bandwidth(path, cache_key)
    if bandwidth is None:
        bandwidth = measure_ram_bandwidth(cpu.physical_cores)
        _store_bandwidth(path, cache_key, bandwidth)
    return HardwareProfile(
        gpus=_detect_gpus() if with_gpus else (),
        cpu=cpu,
        ram_total_bytes=int(memory.total),
        ram_available_bytes=int(memory.available),
        ram_bandwidth_bytes_per_s=bandwidth,
    )


def _detect_cpu() -> CpuInfo:
    import psutil

    model = "unknown CPU"
    flags: frozenset[str] = frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key == "flags" and not flags:
                flags = frozenset(value.split())
    except OSError:
        pass  # not Linux: no ISA flags, which only disables the AMX safety check
    logical = psutil.cpu_count(logical=True) or 1
    physical = psutil.cpu_count(logical=False) or logical
    return CpuInfo(model=model, physical_cores=physical, logical_cores=logical, flags=flags)


def measure_ram_bandwidth(threads: int) -> float:
    """Best of a few parallel numpy copies (bytes read + written per second), one buffer pair per thread."""
    import numpy as np

    n_threads = max(1, threads)
    n_floats = BANDWIDTH_PROBE_BYTES_PER_THREAD // 4
    sources = [np.ones(n_floats, dtype=np.float32) for _ in range(n_threads)]
    targets = [np.empty_like(source) for source in sources]

    def copy(i: int) -> None:
        np.copyto(targets[i], sources[i])  # numpy releases the GIL for large copies

    best = float("inf")
    with ThreadPoolExecutor(max_workers=n_threads) as pool:
        list(pool.map(copy, range(n_threads)))  # warm-up: page in the targets
        for _ in range(BANDWIDTH_PROBE_REPEATS):
            start = time.perf_counter()
            list(pool.map(copy, range(n_threads)))
            best = min(best, time.perf_counter() - start)
    return 2 * BANDWIDTH_PROBE_BYTES_PER_THREAD * n_threads / best


def _cached_bandwidth(path: Path, key: str) -> float | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key:
        return None
    value = data.get("ram_bandwidth_bytes_per_s")
    return float(value) if isinstance(value, int | float) and value > 0 else None


def _store_bandwidth(path: Path, key: str, bandwidth: float) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "ram_bandwidth_bytes_per_s": bandwidth}, indent=1))
    except OSError:
        pass  # a read-only home only costs a re-measurement next time


def _visible_gpu_order(n_devices: int, uuids: list[str]) -> list[int]:
    """Indices of the GPUs CUDA will expose, in CUDA's order (CUDA_VISIBLE_DEVICES: indices or UUIDs)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(range(n_devices))
    order: list[int] = []
    for item in (part.strip() for part in visible.split(",")):
        if not item:
            continue
        if item.isdigit():
            index = int(item)
            if index >= n_devices:
                break  # CUDA stops at the first invalid entry
            order.append(index)
        else:
            matches = [i for i, uuid in enumerate(uuids) if uuid.startswith(item)]
            if len(matches) != 1:
                break
            order.append(matches[0])
    return order


def _detect_gpus() -> tuple[GpuInfo, ...]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no NVIDIA driver (pynvml raises its own NVMLError subclasses): a CPU-only machine
        return ()
    try:
        count = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        uuids = [_nvml_str(pynvml.nvmlDeviceGetUUID(h)) for h in handles]
        return tuple(_gpu_info(pynvml, handles[i]) for i in _visible_gpu_order(count, uuids))
    finally:
        pynvml.nvmlShutdown()


def _nvml_str(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _nvml_or(default: int, call: Any, *args: Any) -> int:
    try:
        return int(call(*args))
    except Exception:  # a field this GPU / driver does not report
        return default


def _gpu_info(pynvml: Any, handle: Any) -> GpuInfo:
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    bus_width_bits = _nvml_or(0, pynvml.nvmlDeviceGetMemoryBusWidth, handle)
    memory_clock_mhz = _nvml_or(0, pynvml.nvmlDeviceGetMaxClockInfo, handle, pynvml.NVML_CLOCK_MEM)
    # NVML's memory clock is half the data rate for both GDDR and HBM: bytes/s = clock x 2 x bus width / 8
    bandwidth = memory_clock_mhz * 1e6 * 2 * bus_width_bits / 8 or DEFAULT_GPU_BANDWIDTH_BYTES_PER_S
    return GpuInfo(
        name=_nvml_str(pynvml.nvmlDeviceGetName(handle)),
        total_bytes=int(memory.total),
        free_bytes=int(memory.free),
        memory_bandwidth_bytes_per_s=float(bandwidth),
        pcie_generation=_nvml_or(DEFAULT_PCIE_GENERATION, pynvml.nvmlDeviceGetMaxPcieLinkGeneration, handle),
        pcie_width=_nvml_or(DEFAULT_PCIE_WIDTH, pynvml.nvmlDeviceGetMaxPcieLinkWidth, handle),
    )
