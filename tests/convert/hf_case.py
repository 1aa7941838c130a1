"""The record the `hf_case` fixture hands out (kept apart from tiny_hf.py so conftest stays torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convert.hf_to_gguf import ConversionSummary


@dataclass(frozen=True)
class HfCase:
    """A tiny Hugging Face checkpoint, its transformers model, and its f32 GGUF conversion."""

    arch: str
    hf_dir: Path
    gguf_f32: Path
    model: Any
    summary: ConversionSummary
