"""bench.compare, bench.llama_server and bench.process: command lines, ratios, caching, process handling.

Nothing here builds llama.cpp or loads a model; the process tests start tiny Python children on loopback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench.compare import (
    DEFAULT_OURS_COMMAND,
    LLAMA_CPP_PYTHON,
    LLAMA_SERVER,
    OURS,
    CompareError,
    CompareSettings,
    compare_to_json,
    compute_ratios,
    eos_token_id,
    free_port,
    level_order,
    llama_cpp_python_spec,
    merge_level_reports,
    ours_command,
    parse_servers,
    server_spec,
)
from bench.llama_server import (
    CMAKE_OPTIONS,
    LlamaServerSettings,
    cache_layout,
    cmake_build_command,
    cmake_configure_command,
    cpu_has_amx,
    ensure_llama_server,
    llama_server_command,
)
from bench.process import ServerSpec, ServerStartError, run_server
from bench.stats import LoadReport, RequestResult, RunSettings, summarize_level, validate_report_json


def _settings(**overrides: object) -> CompareSettings:
    values: dict[str, object] = {
        "model": "smollm2-135m-instruct",
        "model_path": Path("/models/smol.gguf"),
        "threads": 2,
        "parallel": 16,
        "ctx_per_slot": 512,
        "concurrency_levels": (1, 4, 16),
        "requests_per_level": (4, 16, 64),
        "max_tokens": 64,
        "servers": (LLAMA_SERVER, OURS, LLAMA_CPP_PYTHON),
        "ours_command": DEFAULT_OURS_COMMAND,
        "ours_health_path": "/health",
        "anchor_ban_eos": True,
    }
    values.update(overrides)
    return CompareSettings(**values)  # type: ignore[arg-type]


def test_ours_command_fills_every_placeholder() -> None:
    command = ours_command(DEFAULT_OURS_COMMAND, _settings(), 8123)
    assert command[0] == sys.executable
    assert command[1:4] == ("-m", "server", "--model")
    joined = " ".join(command)
    assert "--port 8123" in joined and "--parallel 16" in joined and "--threads 2" in joined
    assert "--ctx-size 512" in joined and "--host 127.0.0.1" in joined
    custom = ours_command("serve {model_path} --n-ctx={ctx_total}", _settings(), 1)
    assert custom == ("serve", "/models/smol.gguf", "--n-ctx=8192")


def test_bad_ours_template_is_refused() -> None:
    with pytest.raises(CompareError, match="placeholder"):
        ours_command("python -m server --slots {slots}", _settings(), 1)


def test_servers_are_a_known_subset_in_the_given_order() -> None:
    assert parse_servers("ours, llama-server") == (OURS, LLAMA_SERVER)
    assert parse_servers("ours,ours") == (OURS,)
    for bad in ("", "vllm", "ours,vllm"):
        with pytest.raises(CompareError):
            parse_servers(bad)


def test_level_order_alternates() -> None:
    servers = (LLAMA_SERVER, OURS, LLAMA_CPP_PYTHON)
    assert level_order(servers, 0) == servers
    assert level_order(servers, 1) == tuple(reversed(servers))
    assert level_order(servers, 2) == servers


def test_servers_get_the_same_threads_slots_and_context() -> None:
    settings = _settings()
    reference = server_spec(LLAMA_SERVER, settings, Path("/cache/llama-server"))
    command = list(reference.command)
    assert command[0] == "/cache/llama-server"
    assert command[command.index("--ctx-size") + 1] == str(512 * 16)  # llama-server splits it over slots
    assert command[command.index("--parallel") + 1] == "16"
    assert command[command.index("--threads") + 1] == "2"
    assert reference.health_url.endswith("/health") and reference.base_url.endswith("/v1")
    anchor = list(llama_cpp_python_spec(settings, 9000).command)
    assert anchor[anchor.index("--n_ctx") + 1] == "512"
    assert anchor[anchor.index("--n_threads") + 1] == "2"
    assert anchor[anchor.index("--interrupt_requests") + 1] == "False"
    ours = server_spec(OURS, settings, None)
    assert ours.health_url.startswith("http://127.0.0.1:") and ours.health_url.endswith("/health")


def _report(label: str, tok_per_request: int, duration: float, levels: tuple[int, ...]) -> LoadReport:
    summaries = tuple(
        summarize_level(
            level,
            tok_per_request,
            [
                RequestResult(
                    started_at=0.0,
                    finished_at=duration,
                    first_token_at=duration / 10,
                    token_chunk_times=tuple(duration / 10 * (i + 1) for i in range(tok_per_request)),
                    n_output_tokens=tok_per_request,
                    usage_reported=True,
                )
            ]
            * level,
        )
        for level in levels
    )
    settings = RunSettings(
        base_url="http://127.0.0.1:1/v1",
        model="m",
        max_tokens=tok_per_request,
        concurrency_levels=levels,
        requests_per_level=levels,
        n_prompts=1,
        sent_ignore_eos=True,
    )
    return LoadReport(label=label, settings=settings, levels=summaries)


def test_ratios_compare_ours_with_both_references() -> None:
    reports = {
        LLAMA_SERVER: _report(LLAMA_SERVER, 10, 1.0, (1, 4)),  # 10 and 40 tok/s
        OURS: _report(OURS, 10, 2.0, (1, 4)),  # 5 and 20 tok/s
        LLAMA_CPP_PYTHON: _report(LLAMA_CPP_PYTHON, 10, 4.0, (1, 4)),  # 2.5 and 10 tok/s
    }
    first, second = compute_ratios(reports, (1, 4))
    assert first.ours_vs_llama_server == pytest.approx(0.5)
    assert first.ours_vs_llama_cpp_python == pytest.approx(2.0)
    assert second.ours_tok_s == pytest.approx(20.0)
    assert second.llama_server_ttft_p50_ms == pytest.approx(100.0)
    assert second.ours_ttft_p50_ms == pytest.approx(200.0)
    (missing,) = compute_ratios({LLAMA_SERVER: reports[LLAMA_SERVER]}, (4,))
    assert missing.ours_vs_llama_server is None and missing.llama_server_tok_s == pytest.approx(40.0)


def test_single_level_runs_merge_into_one_report_and_json() -> None:
    merged = merge_level_reports(OURS, [_report(OURS, 8, 1.0, (1,)), _report(OURS, 8, 1.0, (16,))])
    assert [level.concurrency for level in merged.levels] == [1, 16]
    assert merged.settings.concurrency_levels == (1, 16)
    assert merged.settings.requests_per_level == (1, 16)
    reports = {OURS: merged, LLAMA_SERVER: _report(LLAMA_SERVER, 8, 1.0, (1, 16))}
    body = json.loads(
        json.dumps(compare_to_json(_settings(), reports, compute_ratios(reports, (1, 16)), {OURS: 0.0}, {}))
    )
    assert all(validate_report_json(report) == [] for report in body["reports"].values())
    assert body["ratios"][1]["ours_vs_llama_server"] == pytest.approx(1.0)
    assert body["settings"]["ctx_per_slot"] == 512


def test_eos_token_of_the_bundled_model() -> None:
    from registry.models import resolve_model

    assert eos_token_id(resolve_model("smollm2-135m-instruct").path) == 2


def test_amx_is_read_from_the_flags_line() -> None:
    assert cpu_has_amx("processor\t: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile amx_int8\n")
    assert not cpu_has_amx("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert not cpu_has_amx("model name\t: amx_tile lookalike\nflags\t\t: fpu\n")


def test_llama_server_command_adds_no_repack_only_when_asked() -> None:
    settings = LlamaServerSettings(binary=Path("/b/llama-server"), model_path=Path("/m.gguf"), port=8091)
    assert "--no-repack" not in llama_server_command(settings)
    command = llama_server_command(
        LlamaServerSettings(binary=Path("/b/llama-server"), model_path=Path("/m.gguf"), port=8091, no_repack=True)
    )
    assert "--no-repack" in command
    assert command[command.index("--host") + 1] == "127.0.0.1"


def test_build_commands_build_only_the_server(tmp_path: Path) -> None:
    configure = cmake_configure_command(tmp_path / "src", tmp_path / "build", "Ninja")
    for option in (
        "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DCMAKE_BUILD_TYPE=Release",
    ):
        assert option in configure
    assert set(CMAKE_OPTIONS) <= set(configure)
    assert configure[-2:] == ["-G", "Ninja"]
    assert cmake_build_command(tmp_path / "build", 2)[-4:] == ["--target", "llama-server", "-j", "2"]


def test_cached_binary_is_reused_without_building(tmp_path: Path) -> None:
    layout = cache_layout(cache_root=tmp_path)
    assert layout.root == tmp_path / "llama-server-0.3.36"
    layout.binary.parent.mkdir(parents=True)
    layout.binary.write_text("#!/bin/sh\n")
    # A source dir that does not exist proves nothing is configured or built.
    assert ensure_llama_server(source_dir=tmp_path / "absent", cache_root=tmp_path) == layout.binary


def test_server_that_exits_early_reports_its_log(tmp_path: Path) -> None:
    port = free_port()
    spec = ServerSpec(
        name="crasher",
        command=(sys.executable, "-c", "import sys; print('model file is corrupt'); sys.exit(3)"),
        base_url=f"http://127.0.0.1:{port}/v1",
        health_url=f"http://127.0.0.1:{port}/health",
        startup_timeout_s=30.0,
    )
    with pytest.raises(ServerStartError, match="exited with code 3") as failure, run_server(spec, log_dir=tmp_path):
        pass
    assert "model file is corrupt" in str(failure.value)


def test_healthy_server_is_yielded_and_stopped_afterwards(tmp_path: Path) -> None:
    port = free_port()
    spec = ServerSpec(
        name="static",
        command=(sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)),
        base_url=f"http://127.0.0.1:{port}/v1",
        health_url=f"http://127.0.0.1:{port}/",
        startup_timeout_s=30.0,
    )
    with run_server(spec, log_dir=tmp_path) as running:
        assert running.process.poll() is None
    assert running.process.poll() is not None
