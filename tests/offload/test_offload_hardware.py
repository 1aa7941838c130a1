"""Hardware profiles: size and override parsing, detection with its cache, CUDA's device order."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from offload.hardware import (
    DEFAULT_GPU_BANDWIDTH_BYTES_PER_S,
    GIB,
    CudaDevice,
    HardwareError,
    MigInstance,
    NvmlGpu,
    cuda_device_order,
    detect,
    is_rpc_device,
    parse_bandwidth,
    parse_gpu_spec,
    parse_size,
    pci_bus_id,
    reconcile_gpus,
    with_overrides,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("16GiB", 16 * GIB),
        ("16 GiB", 16 * GIB),
        ("24GB", 24_000_000_000),
        ("1.5GiB", 3 * GIB // 2),
        ("512MiB", 512 * 1024**2),
        ("120g", 120_000_000_000),
        ("4096", 4096),
    ],
)
def test_sizes_parse(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "16 parsecs", "-1GiB", "sixteen"])
def test_bad_sizes_say_how_to_write_them(text: str) -> None:
    with pytest.raises(HardwareError, match="16GiB"):
        parse_size(text)


def test_bandwidth_and_gpu_specs_parse() -> None:
    assert parse_bandwidth("448GB/s") == 448e9
    with pytest.raises(HardwareError, match="GB/s"):
        parse_bandwidth("448GB")
    gpu = parse_gpu_spec("24GB@1008GB/s", 1)
    assert (gpu.total_bytes, gpu.free_bytes, gpu.memory_bandwidth_bytes_per_s) == (24e9, 24e9, 1008e9)
    assert parse_gpu_spec("16GiB", 0).memory_bandwidth_bytes_per_s == DEFAULT_GPU_BANDWIDTH_BYTES_PER_S
    # PCIe 4.0 x16: 16 lanes x 1.969 GB/s
    assert gpu.pcie_bandwidth_bytes_per_s == pytest.approx(31.5e9, rel=1e-3)


def test_detect_reads_this_machine_and_caches_the_bandwidth(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "hardware.json"
    profile = detect(cache_path=cache)
    assert profile.cpu.physical_cores >= 1
    assert 0 < profile.ram_available_bytes <= profile.ram_total_bytes
    assert profile.ram_bandwidth_bytes_per_s > 1e8
    stored = json.loads(cache.read_text())
    assert stored["ram_bandwidth_bytes_per_s"] == profile.ram_bandwidth_bytes_per_s
    # a second detection reuses the measurement instead of measuring again
    stored["ram_bandwidth_bytes_per_s"] = 12.5e9
    cache.write_text(json.dumps(stored))
    assert detect(cache_path=cache).ram_bandwidth_bytes_per_s == 12.5e9
    assert detect(cache_path=cache, refresh=True).ram_bandwidth_bytes_per_s != 12.5e9


def test_overrides_describe_another_machine(tmp_path: Path) -> None:
    profile = detect(cache_path=tmp_path / "hardware.json")
    two = with_overrides(profile, gpus=["16GiB", "24GB@1008GB/s"], ram="120GiB@80GB/s", cores=16)
    assert [g.total_bytes for g in two.gpus] == [16 * GIB, 24_000_000_000]
    assert (two.ram_total_bytes, two.ram_available_bytes, two.ram_bandwidth_bytes_per_s) == (120 * GIB, 120 * GIB, 80e9)
    assert two.cpu.physical_cores == 16
    assert two.overrides == ("gpu", "ram", "cores")
    assert with_overrides(two, gpus=["none"]).gpus == ()
    # RAM size alone keeps the measured bandwidth
    assert with_overrides(profile, ram="64GiB").ram_bandwidth_bytes_per_s == profile.ram_bandwidth_bytes_per_s
    with pytest.raises(HardwareError, match="none"):
        with_overrides(profile, gpus=["none", "16GiB"])
    with pytest.raises(HardwareError, match="positive"):
        with_overrides(profile, cores=0)


# Three GPUs in PCI bus order, the fastest on the middle slot: CUDA's default order is not NVML's.
SLOW = NvmlGpu("GPU slow", "GPU-aaaa1111", "0000:01:00.0", 8 * GIB, 7 * GIB, 288e9, speed=2560 * 1700.0)
FAST = NvmlGpu("GPU fast", "GPU-bbbb2222", "0000:02:00.0", 24 * GIB, 23 * GIB, 1008e9, speed=16384 * 2520.0)
MID = NvmlGpu("GPU mid", "GPU-cccc3333", "0000:41:00.0", 16 * GIB, 15 * GIB, 717e9, speed=9728 * 2505.0)
MIG_A = MigInstance("MIG-dddd4444", gpu_instance_id=1, compute_instance_id=0, total_bytes=10 * GIB, free_bytes=9 * GIB)
MIG_B = MigInstance("MIG-eeee5555", gpu_instance_id=2, compute_instance_id=0, total_bytes=30 * GIB, free_bytes=29 * GIB)
A100 = NvmlGpu(
    "A100", "GPU-ffff6666", "0000:81:00.0", 40 * GIB, 39 * GIB, 1555e9, speed=6912 * 1410.0, mig=(MIG_A, MIG_B)
)


def names(devices: tuple[CudaDevice, ...]) -> list[str]:
    return [device.gpu_info().name for device in devices]


def test_cuda_orders_the_fastest_gpu_first_unless_told_pci_bus_order() -> None:
    nvml_order = [SLOW, FAST, MID]
    assert names(cuda_device_order(nvml_order, {})) == ["GPU fast", "GPU mid", "GPU slow"]
    assert names(cuda_device_order(nvml_order, {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"})) == [
        "GPU fast",
        "GPU mid",
        "GPU slow",
    ]
    pci = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert names(cuda_device_order([MID, FAST, SLOW], pci)) == ["GPU slow", "GPU fast", "GPU mid"]
    # equal (or unknown) speeds keep PCI bus order
    twins = [replace(MID, name="twin b", pci_bus_id="0000:42:00.0"), replace(MID, name="twin a")]
    assert names(cuda_device_order(twins, {})) == ["twin a", "twin b"]


def test_cuda_visible_devices_indexes_cudas_order_not_nvmls() -> None:
    nvml_order = [SLOW, FAST, MID]
    assert names(cuda_device_order(nvml_order, {"CUDA_VISIBLE_DEVICES": "0"})) == ["GPU fast"]
    assert names(cuda_device_order(nvml_order, {"CUDA_VISIBLE_DEVICES": "2, 0"})) == ["GPU slow", "GPU fast"]
    pci = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "2,0"}
    assert names(cuda_device_order(nvml_order, pci)) == ["GPU mid", "GPU slow"]


def test_cuda_visible_devices_takes_uuids_and_unique_prefixes() -> None:
    nvml_order = [SLOW, FAST, MID]
    visible = {"CUDA_VISIBLE_DEVICES": "GPU-cccc3333,GPU-aa"}
    assert names(cuda_device_order(nvml_order, visible)) == ["GPU mid", "GPU slow"]
    mixed = {"CUDA_VISIBLE_DEVICES": "GPU-aaaa1111,0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert names(cuda_device_order(nvml_order, mixed)) == ["GPU slow"]  # index 0 is the same GPU again


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        ("0,7,1", ["GPU fast"]),  # past the last device
        ("1,banana,0", ["GPU mid"]),  # not an index, UUID or MIG
        ("0,,1", ["GPU fast"]),  # an empty entry
        ("GPU-,1", []),  # a prefix of every UUID names no one GPU
        ("GPU-9999,0", []),  # no such UUID
        ("1,1,0", ["GPU mid"]),  # listed twice
        ("-1", []),
        ("", []),
    ],
)
def test_cuda_visible_devices_ends_at_the_first_invalid_entry(visible: str, expected: list[str]) -> None:
    assert names(cuda_device_order([SLOW, FAST, MID], {"CUDA_VISIBLE_DEVICES": visible})) == expected


def test_cuda_visible_devices_selects_mig_instances() -> None:
    gpus = [FAST, A100]
    [device] = cuda_device_order(gpus, {"CUDA_VISIBLE_DEVICES": "MIG-eeee"})
    assert (device.gpu, device.mig) == (A100, MIG_B)
    info = device.gpu_info()
    assert (info.name, info.total_bytes, info.free_bytes) == ("A100 (MIG 2/0)", 30 * GIB, 29 * GIB)
    assert info.memory_bandwidth_bytes_per_s == pytest.approx(1555e9 * 30 / 40)
    legacy = cuda_device_order(gpus, {"CUDA_VISIBLE_DEVICES": "MIG-GPU-ffff6666/1/0,MIG-GPU-ffff6666/3/0,0"})
    assert [(d.gpu, d.mig) for d in legacy] == [(A100, MIG_A)]  # instance 3/0 does not exist: the list ends
    assert cuda_device_order(gpus, {"CUDA_VISIBLE_DEVICES": "MIG-"}) == ()  # two instances match


@dataclass(frozen=True)
class FakeDevice:
    """One ggml device, as bindings.devices.DeviceInfo carries it."""

    name: str
    description: str
    kind: str
    free_bytes: int
    total_bytes: int
    device_id: str | None


CPU_DEVICE = FakeDevice("CPU", "AMD EPYC", "cpu", 100 * GIB, 120 * GIB, None)


def test_llama_cpps_devices_name_and_size_the_gpus_and_nvml_adds_bandwidth() -> None:
    cuda = cuda_device_order([SLOW, FAST, MID], {})  # fast, mid, slow
    ggml = [
        CPU_DEVICE,
        FakeDevice("CUDA0", "GPU fast", "gpu", 22 * GIB + 7, 24 * GIB, "0000:02:00.0"),
        FakeDevice("CUDA1", "GPU mid", "gpu", 14 * GIB + 5, 16 * GIB, "0000:41:00.0"),
        FakeDevice("CUDA2", "GPU slow", "gpu", 6 * GIB + 3, 8 * GIB, "0000:01:00.0"),
    ]
    gpus, problems = reconcile_gpus(cuda, ggml)
    assert problems == ()
    assert [(g.name, g.free_bytes, g.memory_bandwidth_bytes_per_s) for g in gpus] == [
        ("GPU fast", 22 * GIB + 7, 1008e9),
        ("GPU mid", 14 * GIB + 5, 717e9),
        ("GPU slow", 6 * GIB + 3, 288e9),
    ]


def test_disagreements_with_nvml_are_reported_and_llama_cpp_wins() -> None:
    cuda = cuda_device_order([SLOW, FAST], {})  # CUDA order says: fast, slow
    ggml = [
        FakeDevice("CUDA0", "GPU slow", "gpu", 7 * GIB, 8 * GIB, "00000000:01:00.0"),  # llama.cpp disagrees
        FakeDevice("CUDA1", "GPU quick", "gpu", 10 * GIB, 24 * GIB, "0000:02:00.0"),
        FakeDevice("RPC[10.0.0.2:50052]", "remote", "gpu", 4 * GIB, 4 * GIB, None),
    ]
    gpus, problems = reconcile_gpus(cuda, ggml)
    # the GPUs are llama.cpp's, in its order; NVML's data is matched by PCI bus id, not position; the RPC
    # worker's device is another machine's memory, not a local GPU (is_rpc_device)
    assert [(g.name, g.memory_bandwidth_bytes_per_s) for g in gpus] == [
        ("GPU slow", 288e9),
        ("GPU quick", 1008e9),
    ]
    assert problems == (
        "llama.cpp's CUDA0 is GPU slow at 0000:01:00.0, but NVML with CUDA_DEVICE_ORDER/CUDA_VISIBLE_DEVICES "
        "puts the GPU at 0000:02:00.0 there",
        "llama.cpp's CUDA1 is GPU quick at 0000:02:00.0, but NVML with CUDA_DEVICE_ORDER/CUDA_VISIBLE_DEVICES "
        "puts the GPU at 0000:01:00.0 there",
        "CUDA1: llama.cpp says 'GPU quick', NVML 'GPU fast'",
        "CUDA1: llama.cpp reports 10.00 GiB free, NVML 23.00 GiB",
    )
    _, fewer = reconcile_gpus(cuda, ggml[:1])
    assert fewer[-1] == "llama.cpp sees 1 CUDA device(s), NVML with CUDA_VISIBLE_DEVICES 2"


def test_pci_bus_ids_normalize() -> None:
    assert pci_bus_id("00000000:0A:00.0") == "0000:0a:00.0"
    assert pci_bus_id("0000:0a:00.0") == "0000:0a:00.0"
    assert pci_bus_id("3:00.1") == "0000:03:00.1"
    assert pci_bus_id("CUDA0") is None


# ---------------------------------------------------------------- detection through NVML (faked: no GPU here)


@dataclass
class FakeNvml:
    """The pynvml calls detection makes, over a list of NvmlGpu; `broken` makes one call raise."""

    gpus: list[NvmlGpu]
    broken: dict[str, BaseException] = field(default_factory=dict)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import pynvml

        def call(name: str, result: Any) -> Any:
            def function(*args: Any) -> Any:
                if name in self.broken:
                    raise self.broken[name]
                return result(*args)

            monkeypatch.setattr(pynvml, name, function)

        not_supported = pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

        def mig_mode(handle: Any) -> tuple[int, int]:
            if isinstance(handle, MigInstance) or not self.gpus[handle].mig:
                raise not_supported
            return (pynvml.NVML_DEVICE_MIG_ENABLE, pynvml.NVML_DEVICE_MIG_ENABLE)

        def mig_handle(handle: int, index: int) -> MigInstance:
            if index >= len(self.gpus[handle].mig):
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
            return self.gpus[handle].mig[index]

        def memory(handle: Any) -> SimpleNamespace:
            item = handle if isinstance(handle, MigInstance) else self.gpus[handle]
            return SimpleNamespace(total=item.total_bytes, free=item.free_bytes)

        def max_clock(handle: int, clock: int) -> int:
            return 1000 if clock == pynvml.NVML_CLOCK_SM else 1313  # (speed / 1000 cores) x 1000 MHz

        call("nvmlInit", lambda: None)
        call("nvmlShutdown", lambda: None)
        call("nvmlDeviceGetCount", lambda: len(self.gpus))
        call("nvmlDeviceGetHandleByIndex", lambda index: index)
        call("nvmlDeviceGetName", lambda h: self.gpus[h].name.encode())
        call("nvmlDeviceGetUUID", lambda h: h.uuid if isinstance(h, MigInstance) else self.gpus[h].uuid)
        call("nvmlDeviceGetPciInfo", lambda h: SimpleNamespace(busId=("0000" + self.gpus[h].pci_bus_id).encode()))
        call("nvmlDeviceGetMemoryInfo", memory)
        call("nvmlDeviceGetMemoryBusWidth", lambda h: 384)
        call("nvmlDeviceGetMaxClockInfo", max_clock)
        call("nvmlDeviceGetNumGpuCores", lambda h: int(self.gpus[h].speed / 1000))
        call("nvmlDeviceGetMaxPcieLinkGeneration", lambda h: 5)
        call("nvmlDeviceGetMaxPcieLinkWidth", lambda h: 8)
        call("nvmlDeviceGetMigMode", mig_mode)
        call("nvmlDeviceGetMaxMigDeviceCount", lambda h: 7)
        call("nvmlDeviceGetMigDeviceHandleByIndex", mig_handle)
        call("nvmlDeviceGetGpuInstanceId", lambda h: h.gpu_instance_id)
        call("nvmlDeviceGetComputeInstanceId", lambda h: h.compute_instance_id)


@pytest.fixture(scope="module")
def hardware_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One RAM bandwidth measurement for every detection below."""
    cache = tmp_path_factory.mktemp("hardware") / "hardware.json"
    detect(cache_path=cache, with_gpus=False)
    return cache


def test_detect_reads_nvml_in_cudas_order(monkeypatch: pytest.MonkeyPatch, hardware_cache: Path) -> None:
    FakeNvml([SLOW, FAST, A100]).install(monkeypatch)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0,MIG-dddd")
    gpus = detect(cache_path=hardware_cache).gpus
    assert [(g.name, g.total_bytes, g.free_bytes) for g in gpus] == [
        ("A100", 40 * GIB, 39 * GIB),  # index 1 of fastest-first: A100 (6912 cores) after FAST (16384)
        ("GPU fast", 24 * GIB, 23 * GIB),
        ("A100 (MIG 1/0)", 10 * GIB, 9 * GIB),
    ]
    # 1313 MHz x 2 x 384 bits / 8, PCIe from NVML
    assert gpus[1].memory_bandwidth_bytes_per_s == pytest.approx(1313e6 * 2 * 384 / 8)
    assert (gpus[1].pcie_generation, gpus[1].pcie_width) == (5, 8)


def test_detect_prefers_llama_cpps_devices_and_warns_on_disagreement(
    monkeypatch: pytest.MonkeyPatch, hardware_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    FakeNvml([SLOW, FAST]).install(monkeypatch)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    agreeing = [CPU_DEVICE, FakeDevice("CUDA0", "GPU fast", "gpu", 22 * GIB + 5, 24 * GIB, "0000:02:00.0")]
    with caplog.at_level(logging.WARNING, logger="offload.hardware"):
        gpus = detect(cache_path=hardware_cache, backend_devices=agreeing).gpus
    assert [(g.name, g.free_bytes) for g in gpus] == [("GPU fast", 22 * GIB + 5)]
    assert [r.message for r in caplog.records] == [
        "GPU check against NVML: llama.cpp sees 1 CUDA device(s), NVML with CUDA_VISIBLE_DEVICES 2"
    ]
    caplog.clear()
    swapped = [CPU_DEVICE, FakeDevice("CUDA0", "GPU slow", "gpu", 7 * GIB, 8 * GIB, "0000:01:00.0")]
    with caplog.at_level(logging.WARNING, logger="offload.hardware"):
        [gpu] = detect(cache_path=hardware_cache, backend_devices=swapped).gpus
    assert gpu.name == "GPU slow"
    assert any("CUDA0 is GPU slow at 0000:01:00.0" in r.message for r in caplog.records)


def test_detect_without_an_nvidia_driver_has_no_gpus(monkeypatch: pytest.MonkeyPatch, hardware_cache: Path) -> None:
    import pynvml

    nvml = FakeNvml([FAST], broken={"nvmlInit": pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)})
    nvml.install(monkeypatch)
    assert detect(cache_path=hardware_cache).gpus == ()


def test_nvml_fields_a_gpu_lacks_fall_back_but_other_errors_surface(
    monkeypatch: pytest.MonkeyPatch, hardware_cache: Path
) -> None:
    import pynvml

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    unsupported = pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
    FakeNvml([FAST], broken={"nvmlDeviceGetMemoryBusWidth": unsupported}).install(monkeypatch)
    [gpu] = detect(cache_path=hardware_cache).gpus
    assert gpu.memory_bandwidth_bytes_per_s == DEFAULT_GPU_BANDWIDTH_BYTES_PER_S
    # a bug (here a TypeError inside a call) is not "a field this GPU lacks": it must not be swallowed
    FakeNvml([FAST], broken={"nvmlDeviceGetMemoryBusWidth": TypeError("bad handle")}).install(monkeypatch)
    with pytest.raises(TypeError, match="bad handle"):
        detect(cache_path=hardware_cache)
    FakeNvml([FAST], broken={"nvmlInit": RuntimeError("broken binding")}).install(monkeypatch)
    with pytest.raises(RuntimeError, match="broken binding"):
        detect(cache_path=hardware_cache)


def test_local_gpu_detection_skips_the_workers_devices() -> None:
    """After register_workers, ggml's registry lists each worker as a GPU-type device named RPC<n>."""
    registry = [
        FakeDevice("CPU", "AMD EPYC", "cpu", 100 * GIB, 120 * GIB, None),
        FakeDevice("RPC0", "10.0.0.2:50052", "gpu", 16 * GIB, 16 * GIB, None),
        FakeDevice("CUDA0", "NVIDIA RTX 4080", "gpu", 14 * GIB, 16 * GIB, "0000:01:00.0"),
        FakeDevice("RPC1", "10.0.0.3:50052", "gpu", 8 * GIB, 8 * GIB, None),
    ]
    assert [is_rpc_device(device) for device in registry] == [False, True, False, True]
    gpus, _ = reconcile_gpus((), registry)
    assert [(gpu.name, gpu.free_bytes) for gpu in gpus] == [("NVIDIA RTX 4080", 14 * GIB)]
    assert reconcile_gpus((), registry[:2]) == ((), ())  # a CPU-only build with a worker: no local GPU
