"""`python -m offload plan`: the table, the JSON document, and one readable line for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from offload.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """detect() caches its RAM bandwidth measurement; keep it out of the real home directory."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_table_shows_devices_layers_speed_and_the_binding_constraint(
    qwen3next_80b_gguf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(
        capsys,
        "plan",
        str(qwen3next_80b_gguf),
        "--gpu",
        "16GiB",
        "--ram",
        "120GiB",
        "--ctx",
        "32768",
        "--ubatch",
        "512",
    )
    assert status == 0, err
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("device"))
    for column in ("budget", "weights", "KV cache", "recurrent", "compute", "free"):
        assert column in header
    assert any(line.startswith("CUDA0 ") for line in lines)
    assert any(line.startswith("CPU ") for line in lines)
    assert "routed experts on CUDA0: layers" in out
    assert "routed experts on CPU: layers" in out
    assert "n_gpu_layers 49" in out
    assert "override: ^blk" in out
    assert "predicted: decode" in out and "prefill" in out
    assert "binding constraint: CUDA0 memory" in out


def test_json_is_the_documented_document(qwen3next_80b_gguf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(
        capsys, "plan", str(qwen3next_80b_gguf), "--gpu", "16GiB", "--ram", "120GiB", "--ctx", "32768",
        "--parallel", "4", "--kv-type", "q8_0", "--ubatch", "512", "--json",
    )  # fmt: skip
    assert status == 0, err
    document = json.loads(out)
    assert [d["name"] for d in document["devices"]] == ["CUDA0", "CPU"]
    for device in document["devices"]:
        for key in ("kind", "budget_bytes", "weights_bytes", "kv_bytes", "recurrent_bytes", "compute_bytes"):
            assert key in device
        assert device["total_bytes"] <= device["budget_bytes"]
    assert len(document["layers"]) == 48
    assert {"index", "device", "experts_device"} <= set(document["layers"][0])
    assert document["n_gpu_layers"] == 49
    assert document["tensor_overrides"][0]["device"] == "CPU"
    assert (document["ctx"], document["parallel"], document["kv_type"]) == (32768, 4, "q8_0")
    assert (document["n_batch"], document["n_ubatch"]) == (512, 512)
    assert document["predicted"]["decode_tokens_per_s"] > 0
    assert document["hardware"]["gpus"][0]["total_bytes"] == 16 * 1024**3
    assert document["llama_cpp"]["context_params"]["type_k"] == 8


def test_no_gpu_plan_for_the_embedded_model(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "plan", "smollm2-135m-instruct", "--gpu", "none", "--ctx", "2048", "--json")
    assert status == 0, err
    document = json.loads(out)
    assert document["model"] == "smollm2-135m-instruct"
    assert [d["name"] for d in document["devices"]] == ["CPU"]
    assert document["n_gpu_layers"] == 0 and document["tensor_overrides"] == []


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["plan", "/nonexistent/model.gguf"], "does not exist"),
        (["plan", "no-such-model"], "unknown model"),
        (["plan", "smollm2-135m-instruct", "--gpu", "16 parsecs"], "cannot read size"),
        (["plan", "smollm2-135m-instruct", "--gpu", "none", "--gpu", "8GiB"], "cannot be combined"),
        (["plan", "smollm2-135m-instruct", "--ctx", "0"], "positive integer"),
        (["plan", "smollm2-135m-instruct", "--kv-type", "q5"], "invalid choice"),
        (["plan", "smollm2-135m-instruct", "--ubatch", "1024", "--batch", "512"], "cannot exceed n_batch"),
        (["plan"], "required"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(
    args: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        status, out, err = run(capsys, *args)
    except SystemExit as exit_:  # argparse's own errors
        status, captured = exit_.code, capsys.readouterr()
        out, err = captured.out, captured.err
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1 and fragment in err


def test_not_a_gguf_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "model.gguf"
    path.write_text("not a model")
    status, _, err = run(capsys, "plan", str(path))
    assert status == 2 and err.count("\n") == 1 and "not a GGUF" in err


def test_a_model_that_fits_nowhere_exits_1_with_the_shortfall(
    qwen3next_80b_gguf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, "plan", str(qwen3next_80b_gguf), "--gpu", "8GiB", "--ram", "16GiB", "--ctx", "8192")
    assert status == 1
    assert out == ""
    assert err.count("\n") == 1 and "short" in err


def test_module_entry_point_runs(qwen3next_80b_gguf: Path, tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "offload", "plan", str(qwen3next_80b_gguf), "--gpu", "24GB", "--ram", "120GiB",
         "--ctx", "8192", "--ubatch", "512", "--kv-type", "f16", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        env={"PATH": "/usr/bin:/bin", "XDG_CACHE_HOME": str(tmp_path), "HOME": str(tmp_path)},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["devices"][0]["name"] == "CUDA0"
