"""`python -m convert synth` and the CLI's usage errors (each other subcommand is tested in its own file)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "convert", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )


def test_synth_writes_a_model_and_refuses_an_unknown_architecture(tmp_path: Path) -> None:
    done = _run("synth", "qwen3moe", str(tmp_path / "moe.gguf"), "--layers", "2")
    assert done.returncode == 0, done.stderr
    reader = gguf.GGUFReader(tmp_path / "moe.gguf")
    assert reader.fields["general.architecture"].contents() == "qwen3moe"
    assert reader.fields["qwen3moe.block_count"].contents() == 2

    unknown = _run("synth", "gpt9", str(tmp_path / "x.gguf"))
    assert unknown.returncode == 1
    assert unknown.stderr.count("\n") == 1 and unknown.stderr.startswith("error: ") and "gpt9" in unknown.stderr
    assert not (tmp_path / "x.gguf").exists()


def test_synth_mtp_adds_the_multi_token_prediction_head(tmp_path: Path) -> None:
    done = _run("synth", "qwen3next", str(tmp_path / "mtp.gguf"), "--mtp")
    assert done.returncode == 0, done.stderr
    reader = gguf.GGUFReader(tmp_path / "mtp.gguf")
    assert reader.fields["qwen3next.nextn_predict_layers"].contents() == 1
    assert "blk.4.nextn.eh_proj.weight" in {tensor.name for tensor in reader.tensors}

    refused = _run("synth", "llama", str(tmp_path / "x.gguf"), "--mtp")
    assert refused.returncode == 1 and refused.stderr.startswith("error: ") and "qwen3next only" in refused.stderr
    assert not (tmp_path / "x.gguf").exists()


def test_usage_errors_exit_2() -> None:
    assert _run().returncode == 2
    assert _run("convert-everything").returncode == 2
    assert _run("quantize", "only-one-path").returncode == 2
