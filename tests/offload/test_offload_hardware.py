"""Hardware profiles: size and override parsing, detection with its cache, CUDA's device order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from offload.hardware import (
    DEFAULT_GPU_BANDWIDTH_BYTES_PER_S,
    GIB,
    HardwareError,
    _visible_gpu_order,
    detect,
    parse_bandwidth,
    parse_gpu_spec,
    parse_size,
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


def test_cuda_visible_devices_orders_and_filters_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    uuids = ["GPU-aaaa", "GPU-bbbb", "GPU-cccc"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _visible_gpu_order(3, uuids) == [0, 1, 2]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert _visible_gpu_order(3, uuids) == [2, 0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb,7,0")
    assert _visible_gpu_order(3, uuids) == [1]  # CUDA stops at the first invalid entry
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert _visible_gpu_order(3, uuids) == []
