"""`python -m convert quantize`: recipes predicted in Python, applied by llama.cpp, checked on the written file."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
from hf_case import HfCase
from tiny_hf import PROMPT, greedy_generate, relative_error

from convert.quantize import (
    QuantizeError,
    build_recipe,
    plan_types,
    quantize_gguf,
    split_sizes,
    with_fallback,
)
from offload.gguf_shape import read_model_shape

Q = gguf.GGMLQuantizationType
REPO_ROOT = Path(__file__).resolve().parents[2]


def _written_types(path: Path) -> dict[str, Q]:
    return {t.name: Q(t.tensor_type) for t in gguf.GGUFReader(path).tensors}


def _leftovers(directory: Path) -> list[Path]:
    return sorted(directory.glob(".*.partial"))


def test_moe_offload_quantization_loads_generates_and_has_the_planned_types(
    hf_case: Callable[[str], HfCase], hf_tokenizer: object, tmp_path: Path
) -> None:
    source = hf_case("qwen3next").gguf_f32
    out = tmp_path / "q4km-offload.gguf"

    report = quantize_gguf(source, out, "Q4_K_M", recipe="moe-offload", n_threads=2)

    written = _written_types(out)
    planned = {p.name: p.target_type for p in plan_types(read_model_shape(source).tensors, report.recipe.rules)}
    assert written == planned
    assert report.recipe.gpu_type == Q.Q8_0
    expected = {
        "blk.0.ffn_gate_exps.weight": Q.Q4_K,  # routed experts: the requested 4 bits
        "blk.0.ffn_up_exps.weight": Q.Q4_K,
        "blk.0.ffn_down_exps.weight": Q.Q5_K,  # one step more for the down projection (the _M mix)
        "blk.0.attn_qkv.weight": Q.Q8_0,  # Gated DeltaNet projections: GPU-resident, 8 bits
        "blk.0.ssm_out.weight": Q.Q8_0,
        "blk.0.ffn_up_shexp.weight": Q.Q8_0,  # shared expert
        "blk.3.attn_q.weight": Q.Q8_0,  # full attention
        "output.weight": Q.Q8_0,
        "token_embd.weight": Q.Q8_0,
        "blk.0.ffn_gate_inp.weight": Q.F32,  # router, never quantized
        "blk.0.ssm_conv1d.weight": Q.F32,
        "blk.0.ssm_a": Q.F32,
        "blk.0.attn_norm.weight": Q.F32,
    }
    assert {name: written[name] for name in expected} == expected
    assert report.predicted == report.after
    assert report.after.total * 4 < report.before.total
    assert report.after.experts < report.after.gpu * 4  # 4-bit experts, 8-bit rest
    assert _leftovers(tmp_path) == []

    prompt = hf_tokenizer.encode(PROMPT).ids  # type: ignore[attr-defined]
    generated, logits = greedy_generate(out, prompt, 8)
    _, f32_logits = greedy_generate(source, prompt, 1)
    assert len(generated) == 8 and all(0 <= t < 320 for t in generated)
    assert np.isfinite(logits).all()
    # clearly the same function, quantized (unrelated logits of the same size would be ~1.4 apart)
    assert relative_error(logits, f32_logits) < 0.75


def test_the_gpu_type_drops_until_the_gpu_part_fits_the_budget(hf_case: Callable[[str], HfCase]) -> None:
    shape = read_model_shape(hf_case("qwen3next").gguf_f32)

    def gpu_bytes(gpu_budget: int) -> tuple[Q | None, int]:
        recipe = build_recipe("moe-offload", "Q4_K_M", shape, gpu_budget)
        return recipe.gpu_type, split_sizes(plan_types(shape.tensors, recipe.rules), target=True).gpu

    q8_type, q8_bytes = gpu_bytes(1 << 40)
    q6_type, q6_bytes = gpu_bytes(q8_bytes - 1)
    q5_type, q5_bytes = gpu_bytes(q6_bytes - 1)
    q4_type, q4_bytes = gpu_bytes(q5_bytes - 1)
    assert (q8_type, q6_type, q5_type, q4_type) == (Q.Q8_0, Q.Q6_K, Q.Q5_K, Q.Q4_K)
    assert q8_bytes > q6_bytes > q5_bytes > q4_bytes
    with pytest.raises(QuantizeError, match="need more than the GPU budget"):
        build_recipe("moe-offload", "Q4_K_M", shape, q4_bytes - 1)


def test_fallback_types_are_predicted_like_llama_cpp_applies_them(
    hf_case: Callable[[str], HfCase], tmp_path: Path
) -> None:
    assert with_fallback(Q.Q4_K, 256) == Q.Q4_K
    assert with_fallback(Q.Q4_K, 64) == Q.Q5_0
    assert with_fallback(Q.Q6_K, 96) == Q.Q8_0
    assert with_fallback(Q.Q4_K, 48) == Q.F16
    source = hf_case("qwen3moe").gguf_f32  # 64 wide: no K-quant fits a row
    out = tmp_path / "moe.gguf"

    report = quantize_gguf(source, out, "Q4_K_M", recipe="moe-offload", n_threads=2)

    written = _written_types(out)
    assert written == {p.name: p.target_type for p in plan_types(read_model_shape(source).tensors, report.recipe.rules)}
    assert written["blk.0.ffn_gate_exps.weight"] == Q.Q5_0  # Q4_K asked, rows of 64
    assert written["blk.0.ffn_down_exps.weight"] == Q.Q5_1  # Q5_K asked, rows of 32
    assert written["blk.0.attn_q.weight"] == Q.Q8_0


def test_default_recipe_is_llama_cpps_own_mix(hf_case: Callable[[str], HfCase], tmp_path: Path) -> None:
    report = quantize_gguf(hf_case("qwen3next").gguf_f32, tmp_path / "d.gguf", "Q4_K_M", n_threads=2)
    assert report.recipe.rules == () and report.predicted is None
    assert _written_types(tmp_path / "d.gguf")["blk.0.ffn_gate_exps.weight"] == Q.Q4_K
    assert "recipe default" in report.render()


def test_refusals(hf_case: Callable[[str], HfCase], tmp_path: Path) -> None:
    with pytest.raises(QuantizeError, match="has no routed experts"):
        quantize_gguf(hf_case("llama").gguf_f32, tmp_path / "x.gguf", "Q4_K_M", recipe="moe-offload")
    with pytest.raises(QuantizeError, match="unknown --type 'Q3_XL'"):
        quantize_gguf(hf_case("llama").gguf_f32, tmp_path / "x.gguf", "Q3_XL")
    quantized = tmp_path / "q8.gguf"
    quantize_gguf(hf_case("llama").gguf_f32, quantized, "Q8_0", n_threads=2)
    with pytest.raises(QuantizeError, match=r"already quantized \(Q8_0\)"):
        quantize_gguf(quantized, tmp_path / "x.gguf", "Q4_K_M")
    with pytest.raises(QuantizeError, match="is the input file"):
        quantize_gguf(quantized, quantized, "Q4_K_M")
    assert not (tmp_path / "x.gguf").exists() and _leftovers(tmp_path) == []


def _unknown_arch_gguf(path: Path) -> Path:
    writer = gguf.GGUFWriter(path, arch="mystery")
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_tensor("blk.0.ffn_up.weight", np.ones((32, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_cli_quantize_prints_sizes_and_fails_in_one_line(hf_case: Callable[[str], HfCase], tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "convert", "quantize", *args, "--threads", "2"]
        return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)

    done = run(
        str(hf_case("qwen3next").gguf_f32), str(tmp_path / "q.gguf"), "--type", "Q4_K_M", "--recipe", "moe-offload"
    )
    assert done.returncode == 0, done.stderr
    assert "GPU-resident weights as Q8_0" in done.stdout and "planned" in done.stdout and "after" in done.stdout

    broken = run(str(_unknown_arch_gguf(tmp_path / "mystery.gguf")), str(tmp_path / "m.gguf"))
    assert broken.returncode == 1
    assert broken.stderr.count("\n") == 1 and broken.stderr.startswith("error: ")
    assert "mystery" in broken.stderr
    assert not (tmp_path / "m.gguf").exists() and _leftovers(tmp_path) == []
