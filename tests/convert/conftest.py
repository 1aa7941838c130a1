"""Fixtures of the convert tests: a fake Hugging Face hub (fake_hub.py), a scratch HF_HOME, and tiny
Hugging Face checkpoints with their GGUF conversions (tiny_hf.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_hub import FakeHub
from hf_case import HfCase

from convert.hf_to_gguf import convert_checkpoint


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    hub = FakeHub()
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()


@pytest.fixture
def hf_home(tmp_path: Path) -> Path:
    home = tmp_path / "hf-home"
    home.mkdir()
    return home


@pytest.fixture(scope="session")
def hf_tokenizer() -> Any:
    """The tiny trained tokenizers.Tokenizer (torch and transformers are imported only by tests that need them)."""
    from tiny_hf import train_tokenizer

    return train_tokenizer()


@pytest.fixture(scope="session")
def hf_case(tmp_path_factory: pytest.TempPathFactory, hf_tokenizer: Any) -> Callable[..., HfCase]:
    """hf_case(arch, mtp=False): the tiny checkpoint of `arch` (with an MTP head: qwen3next only), built and
    converted once per test session."""
    from tiny_hf import write_checkpoint

    built: dict[tuple[str, bool], HfCase] = {}

    def get(arch: str, mtp: bool = False) -> HfCase:
        if (arch, mtp) not in built:
            root = tmp_path_factory.mktemp(f"hf-{arch}{'-mtp' if mtp else ''}")
            model = write_checkpoint(arch, root / "checkpoint", hf_tokenizer, mtp=mtp)
            summary = convert_checkpoint(root / "checkpoint", root / "model-f32.gguf", out_type="f32")
            built[arch, mtp] = HfCase(arch, root / "checkpoint", root / "model-f32.gguf", model, summary)
        return built[arch, mtp]

    return get
