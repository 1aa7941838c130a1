"""The RAM a plan leaves, and the prompt cache's default budget out of it (plan, JSON, table, CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from offload.__main__ import main
from offload.gguf_shape import KvType, ModelShape
from offload.hardware import GIB, MIB
from offload.planner import (
    HOST_PROCESS_OVERHEAD,
    PROMPT_CACHE_RAM_FRACTION,
    PlanRequest,
    context_sizes,
    host_ram_left,
    plan,
    prompt_cache_bytes_for,
    ram_margin,
    state_snapshot_bytes,
)
from offload.table import render_table

CTX = 32768
# Qwen3-Next-80B-A3B (offload/shape_fixture.py): 12 attention layers with 2 KV heads of 256 (f16: 2 bytes a
# value), 36 Gated DeltaNet layers whose conv + SSM state is f32 (llama-model.cpp create_memory)
KV_F16_BYTES_PER_TOKEN = 12 * 2 * (2 * 256) * 2
RECURRENT_BYTES_PER_SEQUENCE = 36 * ((4 - 1) * (4096 + 2 * 16 * 128) + 128 * 4096) * 4


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """detect() caches its RAM bandwidth measurement; keep it out of the real home directory."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_a_32k_qwen3next_entry_is_843_mib(qwen3next_80b: ModelShape) -> None:
    """The size the issue quotes, from the shape: 768 MiB of f16 KV and 75 MiB of recurrent state."""
    entry = CTX * qwen3next_80b.kv_bytes_per_token(KvType.F16) + qwen3next_80b.recurrent_bytes_per_sequence
    assert qwen3next_80b.kv_bytes_per_token(KvType.F16) == KV_F16_BYTES_PER_TOKEN
    assert qwen3next_80b.recurrent_bytes_per_sequence == RECURRENT_BYTES_PER_SEQUENCE
    assert round(entry / MIB) == 843


def test_plan_leaves_ram_for_snapshots_then_gives_half_of_the_rest_to_the_prompt_cache(
    qwen3next_80b: ModelShape, machine
) -> None:
    request = PlanRequest(ctx=CTX, parallel=4, kv_type=KvType.F16, n_ubatch=512)
    result = plan(qwen3next_80b, machine((16,), ram_gib=120), request)
    cpu = result.device("CPU")
    # a recurrent model: each of the 4 slots may keep its prompt's whole state after prefill
    assert result.state_snapshot_bytes == 4 * (CTX * KV_F16_BYTES_PER_TOKEN + RECURRENT_BYTES_PER_SEQUENCE)
    assert result.ram_left_bytes == cpu.free_bytes - result.state_snapshot_bytes
    assert result.prompt_cache_bytes == int(result.ram_left_bytes * PROMPT_CACHE_RAM_FRACTION)
    assert 30 * GIB < result.prompt_cache_bytes < 40 * GIB, "tens of 843 MiB entries on a 120 GiB machine"
    document = result.to_json()
    assert document["ram_left_bytes"] == result.ram_left_bytes
    assert document["prompt_cache_bytes"] == result.prompt_cache_bytes
    assert document["state_snapshot_bytes"] == result.state_snapshot_bytes
    table = render_table(result, qwen3next_80b)
    line = next(line for line in table.splitlines() if line.startswith("RAM left:"))
    assert f"{result.prompt_cache_bytes / GIB:.2f} GiB" in line and "prompt snapshots" in line


def test_a_model_that_can_cut_its_memory_back_keeps_no_snapshots(dense_8b: ModelShape, machine) -> None:
    result = plan(dense_8b, machine((16,), ram_gib=64), PlanRequest(ctx=8192, parallel=2))
    assert result.state_snapshot_bytes == 0
    assert result.ram_left_bytes == result.device("CPU").free_bytes
    assert result.prompt_cache_bytes == prompt_cache_bytes_for(result.ram_left_bytes) > 0


def test_host_ram_left_counts_everything_in_ram(qwen3next_80b: ModelShape) -> None:
    available, total = 120 * GIB, 128 * GIB
    left = host_ram_left(
        qwen3next_80b,
        ram_available_bytes=available,
        ram_total_bytes=total,
        ctx=4096,
        parallel=2,
        kv_bytes_per_token=KV_F16_BYTES_PER_TOKEN,
    )
    _, n_ctx = context_sizes(4096, 2)
    used = (
        qwen3next_80b.total_bytes
        + n_ctx * KV_F16_BYTES_PER_TOKEN
        + 2 * RECURRENT_BYTES_PER_SEQUENCE
        + state_snapshot_bytes(qwen3next_80b, 4096, 2, KV_F16_BYTES_PER_TOKEN)
        + HOST_PROCESS_OVERHEAD
        + qwen3next_80b.n_vocab * 2 * 4
    )
    assert left == available - ram_margin(total) - used
    small = host_ram_left(
        qwen3next_80b,
        ram_available_bytes=16 * GIB,
        ram_total_bytes=16 * GIB,
        ctx=4096,
        parallel=2,
        kv_bytes_per_token=KV_F16_BYTES_PER_TOKEN,
    )
    assert small == 0 and prompt_cache_bytes_for(small) == 0, "never negative: no RAM left, no cache"


def test_cli_shows_the_prompt_cache_budget(qwen3next_80b_gguf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", str(qwen3next_80b_gguf), "--gpu", "16GiB", "--ram", "120GiB", "--ctx", str(CTX), "--ubatch", "512"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "RAM left:" in table and "prompt cache" in table
    assert main([*args, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["prompt_cache_bytes"] == int(document["ram_left_bytes"] * PROMPT_CACHE_RAM_FRACTION) > 0
