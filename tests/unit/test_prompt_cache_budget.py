"""--prompt-cache-mib: the flag, and the default the loader derives from the RAM left on the manual path."""

from __future__ import annotations

import logging
from collections import namedtuple
from pathlib import Path

import pytest

from bindings.llama_backend import LlamaBackendConfig
from offload.gguf_shape import KvType, read_model_shape
from offload.hardware import GIB, MIB
from offload.planner import host_ram_left, ram_margin
from registry.models import ResolvedModel
from server.boot import loader
from server.boot.loader import manual_ram_left, prompt_cache_budget
from server.settings import Settings, SettingsError, load_settings

Memory = namedtuple("Memory", "available total")


def test_flag_and_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings([]).prompt_cache_mib is None, "unset: the planner's default"
    assert load_settings(["--prompt-cache-mib", "0"]).prompt_cache_mib == 0
    monkeypatch.setenv("QWEN3_LOCAL_PROMPT_CACHE_MIB", "2048")
    assert load_settings([]).prompt_cache_mib == 2048
    with pytest.raises(SettingsError, match="--prompt-cache-mib"):
        load_settings(["--prompt-cache-mib", "-1"])
    with pytest.raises(SystemExit):  # the count-bounded flag is gone
        load_settings(["--prompt-cache-entries", "32"])


def test_budget_is_the_flag_or_half_the_ram_left(caplog: pytest.LogCaptureFixture) -> None:
    assert prompt_cache_budget(Settings(), 10 * GIB) == {
        "bytes": 5 * GIB,
        "source": "default: half the RAM left",
        "ram_left_bytes": 10 * GIB,
    }
    assert prompt_cache_budget(Settings(prompt_cache_mib=0), 10 * GIB)["bytes"] == 0
    with caplog.at_level(logging.WARNING):
        too_much = prompt_cache_budget(Settings(prompt_cache_mib=4096), 1 * GIB)
    assert too_much["bytes"] == 4096 * MIB and too_much["source"] == "--prompt-cache-mib"
    assert "may make the machine swap" in caplog.text


def test_manual_ram_left_counts_the_model_its_kv_cache_and_snapshots(
    tiny_qwen3next_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loader.psutil, "virtual_memory", lambda: Memory(available=20 * GIB, total=24 * GIB))
    model = ResolvedModel(name="tiny", path=tiny_qwen3next_gguf)
    config = LlamaBackendConfig(n_slots=4, n_ctx_per_slot=4096, type_k="q8_0", type_v="q8_0")
    shape = read_model_shape(tiny_qwen3next_gguf)
    expected = host_ram_left(
        shape,
        ram_available_bytes=20 * GIB,
        ram_total_bytes=24 * GIB,
        ctx=4096,
        parallel=4,
        kv_bytes_per_token=shape.kv_bytes_per_token(KvType.Q8_0),
    )
    assert manual_ram_left(model, config) == expected < 20 * GIB - ram_margin(24 * GIB)
    f32 = manual_ram_left(model, LlamaBackendConfig(n_slots=4, n_ctx_per_slot=4096, type_k="f32", type_v="f32"))
    f16 = manual_ram_left(model, LlamaBackendConfig(n_slots=4, n_ctx_per_slot=4096, type_k="f16", type_v="f16"))
    assert f32 < f16, "an f32 KV cache takes twice f16's bytes"


def test_manual_ram_left_of_an_unreadable_gguf_counts_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader.psutil, "virtual_memory", lambda: Memory(available=20 * GIB, total=24 * GIB))
    path = tmp_path / "odd.gguf"
    path.write_bytes(b"not a gguf header" * 64)
    left = manual_ram_left(ResolvedModel(name="odd", path=path), LlamaBackendConfig())
    assert left == 20 * GIB - ram_margin(24 * GIB) - path.stat().st_size
