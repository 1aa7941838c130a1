"""bench.stash_cost on a tiny model: it measures real stashes and loads, and the numbers hang together."""

from __future__ import annotations

from pathlib import Path

from bench.stash_cost import MIB, measure


def test_measure_times_a_stash_a_save_and_a_load_of_the_slot(tiny_qwen3next_gguf: Path) -> None:
    small = measure(tiny_qwen3next_gguf, "tiny", 64, flash_attn="off", repeats=2, threads=1)
    large = measure(tiny_qwen3next_gguf, "tiny", 256, flash_attn="off", repeats=2, threads=1)
    assert 0 < small.state_bytes < large.state_bytes, "the state grows with the tokens in the slot"
    for result in (small, large):
        assert result.stash_ms > 0 and result.save_ms > 0 and result.load_ms > 0 and result.size_query_ms > 0
        assert result.stash_ms_per_mib == result.stash_ms / (result.state_bytes / MIB)
