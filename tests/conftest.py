"""Fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest

from convert.synth import write_synthetic_model


@pytest.fixture(scope="session")
def tiny_qwen3next_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight qwen3next GGUF (f32): 4 layers, Gated DeltaNet in 0-2, full attention in 3."""
    return write_synthetic_model("qwen3next", tmp_path_factory.mktemp("models") / "tiny-qwen3next.gguf")


@pytest.fixture(scope="session")
def tiny_qwen3next_mtp_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny qwen3next (f32) with a multi-token-prediction head that guesses well (convert/synth.py, --mtp)."""
    return write_synthetic_model("qwen3next", tmp_path_factory.mktemp("models") / "tiny-qwen3next-mtp.gguf", mtp=True)


@pytest.fixture(scope="session")
def tiny_qwen3moe_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight qwen3moe GGUF (f32): 2 attention + MoE layers."""
    return write_synthetic_model("qwen3moe", tmp_path_factory.mktemp("models") / "tiny-qwen3moe.gguf")


@pytest.fixture(scope="session")
def tiny_llama_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight llama GGUF (f32): 2 dense layers."""
    return write_synthetic_model("llama", tmp_path_factory.mktemp("models") / "tiny-llama.gguf")
