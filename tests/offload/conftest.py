"""Fixtures for the planner tests: header-only GGUFs of real model shapes, and machines described by hand."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from offload.gguf_shape import ModelShape, read_model_shape
from offload.hardware import GIB, CpuInfo, GpuInfo, HardwareProfile
from offload.shape_fixture import Q4_K as Q4_K_TYPE
from offload.shape_fixture import dense_model, qwen3next_80b_a3b_q4_k_m, write_header_only_gguf

MachineFactory = Callable[..., HardwareProfile]


@pytest.fixture(scope="session")
def qwen3next_80b_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 45 GiB Qwen3-Next-80B-A3B-Instruct Q4_K_M file whose data section is a sparse hole (a few MB on disk)."""
    path = tmp_path_factory.mktemp("shapes") / "Qwen3-Next-80B-A3B-Instruct-Q4_K_M.gguf"
    return write_header_only_gguf(qwen3next_80b_a3b_q4_k_m(), path)


@pytest.fixture(scope="session")
def qwen3next_80b(qwen3next_80b_gguf: Path) -> ModelShape:
    return read_model_shape(qwen3next_80b_gguf)


@pytest.fixture(scope="session")
def dense_8b(tmp_path_factory: pytest.TempPathFactory) -> ModelShape:
    """A Llama-3-8B-shaped dense model, all matrices Q4_K (4.2 GiB)."""
    model = dense_model(32, 4096, 14336, 32, 8, 128256, Q4_K_TYPE)
    return read_model_shape(write_header_only_gguf(model, tmp_path_factory.mktemp("shapes") / "dense-8b.gguf"))


@pytest.fixture(scope="session")
def dense_70b(tmp_path_factory: pytest.TempPathFactory) -> ModelShape:
    """A Llama-3-70B-shaped dense model, all matrices Q4_K (37.0 GiB)."""
    model = dense_model(80, 8192, 28672, 64, 8, 128256, Q4_K_TYPE)
    return read_model_shape(write_header_only_gguf(model, tmp_path_factory.mktemp("shapes") / "dense-70b.gguf"))


@pytest.fixture
def machine() -> MachineFactory:
    """machine(gpus_gib=(16,), ram_gib=120): a 16-core host with 80 GB/s RAM and 448 GB/s PCIe-4 GPUs."""

    def make(
        gpus_gib: Sequence[float] = (),
        ram_gib: float = 120,
        cores: int = 16,
        ram_bandwidth: float = 80e9,
        gpu_bandwidth: float = 448e9,
    ) -> HardwareProfile:
        gpus = tuple(
            GpuInfo(f"test GPU {i}", int(size * GIB), int(size * GIB), gpu_bandwidth, 4, 16)
            for i, size in enumerate(gpus_gib)
        )
        return HardwareProfile(
            gpus=gpus,
            cpu=CpuInfo("test CPU", cores, 2 * cores, frozenset({"avx2", "fma"})),
            ram_total_bytes=int(ram_gib * GIB),
            ram_available_bytes=int(ram_gib * GIB),
            ram_bandwidth_bytes_per_s=ram_bandwidth,
        )

    return make
