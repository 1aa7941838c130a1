"""What the machine has: GPUs (pynvml), RAM and CPU (psutil, /proc/cpuinfo), and a measured RAM bandwidth.

`detect()` is the only impure function of the planner. The measured RAM bandwidth is the one slow part
(~0.3 s), so it is cached in ~/.cache/qwen3-local/hardware.json, keyed by CPU model, cores and RAM size; free
memory is always read fresh. `with_overrides()` plans for another machine: `--gpu 16GiB --ram 120GiB`,
several `--gpu`, or `--gpu none`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

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


def detect(
    cache_path: Path | None = None,
    refresh: bool = False,
    with_gpus: bool = True,
    backend_devices: Sequence[BackendDevice] | None = None,
) -> HardwareProfile:
    """Probe this machine. The RAM bandwidth measurement is cached at `cache_path` unless `refresh`.

    with_gpus=False ignores the GPUs: pass llama.cpp's llama_supports_gpu_offload() so that a CPU-only build
    is never planned onto a GPU it cannot use. backend_devices: llama.cpp's device registry where the caller
    has it (bindings.devices.list_devices()): then its GPUs, in its order, with its names and free memory,
    are the ones planned for, NVML adds bandwidth and PCIe link, and every disagreement is logged. Without
    it, NVML's GPUs in CUDA's order (cuda_device_order)."""
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
        gpus=_detect_gpus(backend_devices) if with_gpus else (),
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


# ---------------------------------------------------------------------------------------------------------
# GPUs: NVML's devices in CUDA's order, cross-checked against llama.cpp's own device registry

# A CUDA context alone takes a few hundred MiB, and free memory moves between two readings: gaps below this
# between NVML's and llama.cpp's numbers are expected; larger ones mean the two describe different devices.
MEMORY_DISAGREEMENT_BYTES = GIB
GPU_DEVICE_KINDS = frozenset({"gpu", "igpu"})  # ggml_backend_dev_type names (bindings/devices.py)


@dataclass(frozen=True)
class MigInstance:
    """One MIG instance of a GPU: CUDA numbers it as a device of its own."""

    uuid: str  # "MIG-..."
    gpu_instance_id: int
    compute_instance_id: int
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class NvmlGpu:
    """One GPU as NVML enumerates it, with what CUDA's device order depends on."""

    name: str
    uuid: str  # "GPU-..."
    pci_bus_id: str  # normalized by pci_bus_id(): "0000:01:00.0"
    total_bytes: int
    free_bytes: int
    memory_bandwidth_bytes_per_s: float = DEFAULT_GPU_BANDWIDTH_BYTES_PER_S
    pcie_generation: int = DEFAULT_PCIE_GENERATION
    pcie_width: int = DEFAULT_PCIE_WIDTH
    speed: float = 0.0  # for CUDA's FASTEST_FIRST guess: CUDA cores x max SM clock; 0 when NVML does not say
    mig: tuple[MigInstance, ...] = ()


@dataclass(frozen=True)
class CudaDevice:
    """CUDA device N (llama.cpp's CUDA<N>): a whole GPU, or one MIG instance of it."""

    gpu: NvmlGpu
    mig: MigInstance | None = None

    @property
    def total_bytes(self) -> int:
        return self.gpu.total_bytes if self.mig is None else self.mig.total_bytes

    @property
    def free_bytes(self) -> int:
        return self.gpu.free_bytes if self.mig is None else self.mig.free_bytes

    def gpu_info(self) -> GpuInfo:
        name, bandwidth = self.gpu.name, self.gpu.memory_bandwidth_bytes_per_s
        if self.mig is not None:
            name = f"{name} (MIG {self.mig.gpu_instance_id}/{self.mig.compute_instance_id})"
            # an instance owns a share of the memory slices, and so that share of the bandwidth
            bandwidth *= self.mig.total_bytes / max(self.gpu.total_bytes, 1)
        return GpuInfo(
            name=name,
            total_bytes=self.total_bytes,
            free_bytes=self.free_bytes,
            memory_bandwidth_bytes_per_s=bandwidth,
            pcie_generation=self.gpu.pcie_generation,
            pcie_width=self.gpu.pcie_width,
        )


class BackendDevice(Protocol):
    """One device of llama.cpp's (ggml's) registry, as bindings.devices.DeviceInfo describes it. The planner
    may not import the bindings: the caller hands these in."""

    @property
    def name(self) -> str: ...  # "CPU", "CUDA0", "RPC[host:port]", ...

    @property
    def description(self) -> str: ...  # "NVIDIA GeForce RTX 4080"

    @property
    def kind(self) -> str: ...  # "cpu", "gpu", "igpu", "accel", ...

    @property
    def free_bytes(self) -> int: ...

    @property
    def total_bytes(self) -> int: ...

    @property
    def device_id(self) -> str | None: ...  # PCI bus id where the backend knows it


_PCI_BUS_ID = re.compile(r"(?:([0-9a-fA-F]{1,8}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])")


def pci_bus_id(text: str) -> str | None:
    """NVML's '00000000:01:00.0' and CUDA's '0000:01:00.0' alike -> '0000:01:00.0'; None if not a bus id."""
    match = _PCI_BUS_ID.fullmatch(text.strip())
    if match is None:
        return None
    domain, bus, device, function = match.groups()
    return f"{int(domain or '0', 16):04x}:{int(bus, 16):02x}:{int(device, 16):02x}.{function}"


def cuda_device_order(gpus: Sequence[NvmlGpu], environ: Mapping[str, str] | None = None) -> tuple[CudaDevice, ...]:
    """The devices CUDA numbers 0, 1, ... (llama.cpp's CUDA0, CUDA1, ...), from NVML's GPUs and the environment.

    CUDA_DEVICE_ORDER: FASTEST_FIRST (CUDA's default) or PCI_BUS_ID (nvidia-smi's order). CUDA documents
    FASTEST_FIRST only as a heuristic; here it is CUDA cores x SM clock, ties in PCI bus order. Where
    llama.cpp's registry is at hand its order wins and this one is only checked against it (reconcile_gpus).
    CUDA_VISIBLE_DEVICES: comma-separated indices into that order, GPU UUIDs (a unique prefix is enough) or
    MIG instances (MIG-<uuid>, or the older MIG-GPU-<gpu uuid>/<gpu instance>/<compute instance>). As in
    CUDA, the list ends at the first entry that names no device (or one already listed): "0,7,1" with two
    GPUs is device 0 alone; "" and "-1" hide every GPU.
    """
    env = os.environ if environ is None else environ
    by_bus = sorted(gpus, key=lambda gpu: gpu.pci_bus_id)  # normalized ids sort as their numbers
    if env.get("CUDA_DEVICE_ORDER", "").strip().upper() == "PCI_BUS_ID":
        enumerated = by_bus
    else:
        enumerated = sorted(by_bus, key=lambda gpu: -gpu.speed)  # stable: equal speeds keep PCI bus order
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return tuple(CudaDevice(gpu) for gpu in enumerated)
    chosen: list[CudaDevice] = []
    for entry in visible.split(","):
        device = _visible_device(entry.strip(), enumerated)
        if device is None or device in chosen:
            break
        chosen.append(device)
    return tuple(chosen)


def _visible_device(entry: str, enumerated: Sequence[NvmlGpu]) -> CudaDevice | None:
    """The device one CUDA_VISIBLE_DEVICES entry names, or None when it names none (or several)."""
    if entry.isdigit():  # digits only: "-1" and "+1" name no device
        index = int(entry)
        return CudaDevice(enumerated[index]) if index < len(enumerated) else None
    if entry.startswith("MIG-GPU-"):
        gpu_uuid, _, ids = entry.removeprefix("MIG-").partition("/")
        gi, _, ci = ids.partition("/")
        if not (gi.isdigit() and ci.isdigit()):
            return None
        candidates = [
            CudaDevice(gpu, mig)
            for gpu in enumerated
            if gpu.uuid == gpu_uuid
            for mig in gpu.mig
            if (mig.gpu_instance_id, mig.compute_instance_id) == (int(gi), int(ci))
        ]
    elif entry.startswith("MIG-"):
        candidates = [CudaDevice(gpu, mig) for gpu in enumerated for mig in gpu.mig if mig.uuid.startswith(entry)]
    elif entry.startswith("GPU-"):
        candidates = [CudaDevice(gpu) for gpu in enumerated if gpu.uuid.startswith(entry)]
    else:
        return None
    return candidates[0] if len(candidates) == 1 else None


def is_rpc_device(device: BackendDevice) -> bool:
    """A llama.cpp RPC worker's device (RPC0, RPC1, ...: ggml-rpc names them so), which ggml's registry lists as
    a GPU once registered: another machine's memory, never one of this machine's GPUs."""
    return device.name.upper().startswith("RPC")


def reconcile_gpus(
    cuda_devices: Sequence[CudaDevice], backend_devices: Sequence[BackendDevice]
) -> tuple[tuple[GpuInfo, ...], tuple[str, ...]]:
    """The GPUs of llama.cpp's registry (not the RPC workers' devices: is_rpc_device), in its order (the order
    it assigns layers and tensor_split shares in), named and sized as llama.cpp reports them; NVML, matched by
    PCI bus id, adds the memory bandwidth and PCIe link. Returns (gpus, disagreements): each way NVML's view
    (in CUDA's order) differs."""
    problems: list[str] = []
    gpus: list[GpuInfo] = []
    n_cuda = 0
    for device in (d for d in backend_devices if d.kind in GPU_DEVICE_KINDS and not is_rpc_device(d)):
        bus = pci_bus_id(device.device_id) if device.device_id else None
        match: CudaDevice | None = None
        if device.name.upper().startswith("CUDA"):
            n_cuda += 1
            # CUDA<n> is CUDA device n: the order worked out from NVML must put the same GPU there
            ordinal = device.name[4:]
            expected = cuda_devices[int(ordinal)] if ordinal.isdigit() and int(ordinal) < len(cuda_devices) else None
            if expected is not None and bus in (None, expected.gpu.pci_bus_id):
                match = expected
            else:
                where = f"the GPU at {expected.gpu.pci_bus_id}" if expected is not None else "no GPU"
                problems.append(
                    f"llama.cpp's {device.name} is {device.description or 'a GPU'} at {bus or 'an unknown bus id'}, "
                    f"but NVML with CUDA_DEVICE_ORDER/CUDA_VISIBLE_DEVICES puts {where} there"
                )
        if match is None and bus is not None:
            same_bus = [candidate for candidate in cuda_devices if candidate.gpu.pci_bus_id == bus]
            match = same_bus[0] if len(same_bus) == 1 else None
        if match is not None:
            problems += _disagreements(device, match)
        gpus.append(_backend_gpu_info(device, match))
    if n_cuda and n_cuda != len(cuda_devices):  # a build without CUDA (Vulkan, RPC) numbers no CUDA device
        problems.append(f"llama.cpp sees {n_cuda} CUDA device(s), NVML with CUDA_VISIBLE_DEVICES {len(cuda_devices)}")
    return tuple(gpus), tuple(problems)


def _same_name(first: str, second: str) -> bool:
    return " ".join(first.split()).casefold() == " ".join(second.split()).casefold()


def _disagreements(device: BackendDevice, match: CudaDevice) -> list[str]:
    problems = []
    if match.mig is None and device.description and not _same_name(device.description, match.gpu.name):
        problems.append(f"{device.name}: llama.cpp says {device.description!r}, NVML {match.gpu.name!r}")
    for what, ours, nvml in (
        ("free", device.free_bytes, match.free_bytes),
        ("total", device.total_bytes, match.total_bytes),
    ):
        if abs(ours - nvml) > MEMORY_DISAGREEMENT_BYTES:
            problems.append(f"{device.name}: llama.cpp reports {ours / GIB:.2f} GiB {what}, NVML {nvml / GIB:.2f} GiB")
    return problems


def _backend_gpu_info(device: BackendDevice, match: CudaDevice | None) -> GpuInfo:
    nvml = match.gpu_info() if match is not None else None
    return GpuInfo(
        name=device.description or device.name,
        total_bytes=device.total_bytes,
        free_bytes=device.free_bytes,
        memory_bandwidth_bytes_per_s=nvml.memory_bandwidth_bytes_per_s if nvml else DEFAULT_GPU_BANDWIDTH_BYTES_PER_S,
        pcie_generation=nvml.pcie_generation if nvml else DEFAULT_PCIE_GENERATION,
        pcie_width=nvml.pcie_width if nvml else DEFAULT_PCIE_WIDTH,
    )


def _detect_gpus(backend_devices: Sequence[BackendDevice] | None) -> tuple[GpuInfo, ...]:
    nvml_gpus = _nvml_gpus()
    cuda_devices = cuda_device_order(nvml_gpus or ())
    if backend_devices is None:
        return tuple(device.gpu_info() for device in cuda_devices)
    gpus, problems = reconcile_gpus(cuda_devices, backend_devices)
    if nvml_gpus is None:
        if gpus:
            log.info("NVML is not available: GPU bandwidth and PCIe link assumed, not read")
    else:
        for problem in problems:
            log.warning("GPU check against NVML: %s", problem)
    return gpus


def _nvml_gpus() -> list[NvmlGpu] | None:
    """NVML's GPUs; None where there is no NVIDIA driver (or no NVML library)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # LibraryNotFound, DriverNotLoaded, ...: a machine without NVIDIA GPUs
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
        return [_nvml_gpu(pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)) for index in range(count)]
    finally:
        pynvml.nvmlShutdown()


def _nvml_str(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _nvml_or(pynvml: Any, default: int, call: Any, *args: Any) -> int:
    try:
        return int(call(*args))
    except pynvml.NVMLError:  # NotSupported / FunctionNotFound: a field this GPU or driver does not report
        return default


def _nvml_gpu(pynvml: Any, handle: Any) -> NvmlGpu:
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    bus_width_bits = _nvml_or(pynvml, 0, pynvml.nvmlDeviceGetMemoryBusWidth, handle)
    memory_clock_mhz = _nvml_or(pynvml, 0, pynvml.nvmlDeviceGetMaxClockInfo, handle, pynvml.NVML_CLOCK_MEM)
    # NVML's memory clock is half the data rate for both GDDR and HBM: bytes/s = clock x 2 x bus width / 8
    bandwidth = memory_clock_mhz * 1e6 * 2 * bus_width_bits / 8 or DEFAULT_GPU_BANDWIDTH_BYTES_PER_S
    cores = _nvml_or(pynvml, 0, pynvml.nvmlDeviceGetNumGpuCores, handle)
    sm_clock_mhz = _nvml_or(pynvml, 0, pynvml.nvmlDeviceGetMaxClockInfo, handle, pynvml.NVML_CLOCK_SM)
    bus_id = _nvml_str(pynvml.nvmlDeviceGetPciInfo(handle).busId)
    return NvmlGpu(
        name=_nvml_str(pynvml.nvmlDeviceGetName(handle)),
        uuid=_nvml_str(pynvml.nvmlDeviceGetUUID(handle)),
        pci_bus_id=pci_bus_id(bus_id) or bus_id,
        total_bytes=int(memory.total),
        free_bytes=int(memory.free),
        memory_bandwidth_bytes_per_s=float(bandwidth),
        pcie_generation=_nvml_or(pynvml, DEFAULT_PCIE_GENERATION, pynvml.nvmlDeviceGetMaxPcieLinkGeneration, handle),
        pcie_width=_nvml_or(pynvml, DEFAULT_PCIE_WIDTH, pynvml.nvmlDeviceGetMaxPcieLinkWidth, handle),
        speed=float(cores * sm_clock_mhz),
        mig=_nvml_mig_instances(pynvml, handle),
    )


def _nvml_mig_instances(pynvml: Any, handle: Any) -> tuple[MigInstance, ...]:
    try:
        current_mode, _pending_mode = pynvml.nvmlDeviceGetMigMode(handle)
    except pynvml.NVMLError:  # NotSupported: a GPU without MIG
        return ()
    if current_mode != pynvml.NVML_DEVICE_MIG_ENABLE:
        return ()
    instances = []
    for index in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, index)
        except pynvml.NVMLError_NotFound:  # an unused slot
            continue
        memory = pynvml.nvmlDeviceGetMemoryInfo(mig)
        instances.append(
            MigInstance(
                uuid=_nvml_str(pynvml.nvmlDeviceGetUUID(mig)),
                gpu_instance_id=int(pynvml.nvmlDeviceGetGpuInstanceId(mig)),
                compute_instance_id=int(pynvml.nvmlDeviceGetComputeInstanceId(mig)),
                total_bytes=int(memory.total),
                free_bytes=int(memory.free),
            )
        )
    return tuple(instances)
