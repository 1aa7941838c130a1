"""`python -m convert inspect`: what a GGUF holds, with the routed experts' share per layer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf

from convert.inspect import inspect_gguf

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_inspection_of_a_hybrid_moe_model(tiny_qwen3next_gguf: Path) -> None:
    inspection = inspect_gguf(tiny_qwen3next_gguf)
    reader = gguf.GGUFReader(tiny_qwen3next_gguf)

    assert inspection.architecture == "qwen3next" and inspection.n_files == 1
    assert dict(inspection.metadata)["general.architecture"] == "qwen3next"
    assert dict(inspection.metadata)["tokenizer.ggml.tokens"].startswith(
        f"[{len(reader.fields['tokenizer.ggml.tokens'].data)} string: "
    )
    assert sum(t.n_tensors for t in inspection.types) == len(reader.tensors)
    assert inspection.total_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    for layer in inspection.layers:
        prefix = f"blk.{layer.index}."
        in_layer = [t for t in reader.tensors if t.name.startswith(prefix)]
        experts = sum(int(t.n_bytes) for t in in_layer if "_exps." in t.name)
        assert (layer.expert_bytes, layer.other_bytes) == (experts, sum(int(t.n_bytes) for t in in_layer) - experts)
        has_ssm = any(t.name.startswith(prefix + "ssm_") for t in in_layer)
        assert layer.mixer == ("ssm" if has_ssm else "attention")
    assert {layer.mixer for layer in inspection.layers} == {"ssm", "attention"}

    text = inspection.render(max_metadata_chars=40)
    assert "bytes per layer:" in text and "routed experts" in text
    assert all(len(line) < 200 for line in text.splitlines())


def test_cli_inspect(tiny_qwen3next_gguf: Path, tmp_path: Path) -> None:
    def run(path: Path) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "convert", "inspect", str(path)]
        return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)

    done = run(tiny_qwen3next_gguf)
    assert done.returncode == 0, done.stderr
    assert "tensor types:" in done.stdout and "qwen3next" in done.stdout

    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_text("hello")
    failed = run(not_gguf)
    assert failed.returncode == 1
    assert failed.stderr.count("\n") == 1 and "not a GGUF file" in failed.stderr
