"""Benchmarks: reading a GGUF's header into a ModelShape (offload.gguf_shape), what `python -m offload plan`
and the loader do before anything is loaded. The planner on top of it: test_bench_planner.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from offload.gguf_shape import ModelShape, read_model_shape


def test_bench_read_header_80b(benchmark: Any, qwen3next_80b_header: Path) -> None:
    shape: ModelShape = benchmark(read_model_shape, qwen3next_80b_header)
    assert shape.architecture == "qwen3next"
    assert shape.n_layer == 48
    assert shape.total_bytes > 40 * 2**30


def test_bench_read_header_smollm2(benchmark: Any, smollm2_path: Path) -> None:
    shape: ModelShape = benchmark(read_model_shape, smollm2_path)
    assert shape.architecture == "llama"
    assert shape.n_layer == 30
