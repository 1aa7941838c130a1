"""bench/rpc.py runs end to end with tiny parameters (real figures come from a quiet machine, not from here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_bench_rpc_measures_local_and_split_decoding() -> None:
    command = [sys.executable, "-m", "bench.rpc", "--tokens", "6", "--rounds", "1", "--threads", "1", "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    document = json.loads(result.stdout)
    assert [run["config"] for run in document["runs"]] == ["ours-local", "ours-rpc", "ours-rpc-planned"]
    assert all(run["tokens"] == 6 and run["decode_tok_s"] > 0 for run in document["runs"])
    local, split, planned = (run["worker_bytes_per_token"] for run in document["runs"])
    # nothing goes to the workers when all is local; llama-server's split sends n_vocab logits back per token
    assert local is None and split > planned > 0
    assert document["median"]["ours_rpc_over_ours_local"] > 0
