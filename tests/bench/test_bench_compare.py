"""bench.compare, bench.llama_server and bench.process: command lines, ratios, caching, process handling.

Nothing here builds llama.cpp or loads a model; the process tests start tiny Python children on loopback.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from bench.compare import (
    CEILING,
    DEFAULT_OURS_COMMAND,
    LLAMA_CPP_PYTHON,
    LLAMA_SERVER,
    OURS,
    CeilingPlan,
    CeilingRun,
    CompareError,
    CompareResult,
    CompareSettings,
    Spread,
    batched_bench_command,
    ceiling_prompt_tokens,
    compare_to_json,
    compute_ratios,
    eos_token_id,
    format_ratios,
    free_port,
    level_order,
    llama_cpp_python_spec,
    measure_ceiling,
    median_report,
    merge_level_reports,
    ours_command,
    ours_repacks,
    parse_batched_bench_output,
    parse_servers,
    round_schedule,
    server_spec,
    with_cached_prompt,
    yardstick_no_repack,
)
from bench.llama_server import (
    CMAKE_OPTIONS,
    LlamaServerError,
    LlamaServerSettings,
    batched_bench_binary,
    build_key,
    cache_layout,
    cmake_build_command,
    cmake_configure_command,
    cpu_build_options,
    cpu_flags,
    cpu_has_amx,
    ensure_llama_server,
    llama_server_command,
    this_cpu_build_options,
)
from bench.process import ServerSpec, ServerStartError, run_server
from bench.stats import LevelSummary, LoadReport, RequestResult, RunSettings, summarize_level, validate_report_json


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
    assert "--no-repack" not in command  # llama-server's defaults, unless our weights are not repacked
    assert "--no-repack" in server_spec(LLAMA_SERVER, settings, Path("/b"), no_repack=True).command
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


def _ceiling(level: int, tokens: int, prefill_s: float, decode_s: float) -> CeilingRun:
    return CeilingRun(sequences=level, prompt_tokens=40, output_tokens=tokens, prefill_s=prefill_s, decode_s=decode_s)


def test_ratios_compare_ours_with_both_references_and_the_ceiling() -> None:
    rounds = {
        LLAMA_SERVER: [_report(LLAMA_SERVER, 10, 1.0, (1, 4))],  # 10 and 40 tok/s
        OURS: [_report(OURS, 10, 2.0, (1, 4))],  # 5 and 20 tok/s
        LLAMA_CPP_PYTHON: [_report(LLAMA_CPP_PYTHON, 10, 4.0, (1, 4))],  # 2.5 and 10 tok/s
    }
    # 1 × 10 tokens in 0.2 + 0.8 s; 4 × 10 in 0.5 + 0.5 s.
    ceiling = [(_ceiling(1, 10, 0.2, 0.8), _ceiling(4, 10, 0.5, 0.5))]
    first, second = compute_ratios(rounds, (1, 4), ceiling)
    assert first.ours_vs_llama_server == Spread(0.5, 0.5, 0.5, 1)
    assert first.ours_vs_llama_cpp_python is not None and first.ours_vs_llama_cpp_python.median == pytest.approx(2.0)
    assert first.ceiling_tok_s is not None and first.ceiling_tok_s.median == pytest.approx(10.0)
    assert first.ceiling_decode_tok_s is not None and first.ceiling_decode_tok_s.median == pytest.approx(12.5)
    assert first.ours_vs_ceiling is not None and first.ours_vs_ceiling.median == pytest.approx(0.5)
    assert second.ours_tok_s is not None and second.ours_tok_s.median == pytest.approx(20.0)
    assert second.llama_server_vs_ceiling is not None and second.llama_server_vs_ceiling.median == pytest.approx(1.0)
    assert second.llama_server_ttft_p50_ms is not None and second.llama_server_ttft_p50_ms.median == pytest.approx(100)
    assert second.ours_ttft_p50_ms is not None and second.ours_ttft_p50_ms.median == pytest.approx(200.0)
    (missing,) = compute_ratios({LLAMA_SERVER: rounds[LLAMA_SERVER]}, (4,))
    assert missing.ours_vs_llama_server is None and missing.ceiling_tok_s is None
    assert missing.llama_server_tok_s is not None and missing.llama_server_tok_s.median == pytest.approx(40.0)


def test_rounds_give_medians_spreads_and_same_round_ratios() -> None:
    # Round i: llama-server 10 tok/s × (1, 2, 3)[i], ours 9 tok/s × the same: the machine drifts, the ratio holds.
    rounds = {
        LLAMA_SERVER: [_report(LLAMA_SERVER, 10, 1.0 / factor, (1,)) for factor in (1, 2, 3)],
        OURS: [_report(OURS, 9, 1.0 / factor, (1,)) for factor in (1, 2, 3)],
    }
    (row,) = compute_ratios(rounds, (1,))
    assert row.ours_tok_s is not None
    assert (row.ours_tok_s.median, row.ours_tok_s.low, row.ours_tok_s.high) == pytest.approx((18.0, 9.0, 27.0))
    assert row.ours_tok_s.n == 3
    assert row.ours_vs_llama_server is not None
    assert row.ours_vs_llama_server.low == pytest.approx(0.9) and row.ours_vs_llama_server.high == pytest.approx(0.9)
    table = format_ratios((row,))
    assert "18.0 (9.0–27.0)" in table and "0.90 (0.90–0.90)" in table
    assert Spread.of([None, 2.0, 1.0, 4.0]) == Spread(median=2.0, low=1.0, high=4.0, n=3)
    assert Spread.of([None]) is None


def test_median_report_keeps_the_median_round_of_each_level() -> None:
    rounds = [_report(OURS, 10, duration, (1, 4)) for duration in (1.0, 4.0, 2.0)]
    median = median_report(OURS, rounds)
    assert [level.output_tokens_per_s for level in median.levels] == pytest.approx([5.0, 20.0])
    assert median.levels[0].ttft_p50_ms == pytest.approx(200.0)  # the TTFT of that same round
    even = median_report(OURS, rounds[:2])  # lower median: a measured round, not an average
    assert even.levels[0].output_tokens_per_s == pytest.approx(2.5)


def test_single_level_runs_merge_into_one_report_and_json() -> None:
    merged = merge_level_reports(OURS, [_report(OURS, 8, 1.0, (1,)), _report(OURS, 8, 1.0, (16,))])
    assert [level.concurrency for level in merged.levels] == [1, 16]
    assert merged.settings.concurrency_levels == (1, 16)
    assert merged.settings.requests_per_level == (1, 16)
    rounds = {OURS: [merged, merged], LLAMA_SERVER: [_report(LLAMA_SERVER, 8, 1.0, (1, 16))] * 2}
    ceiling = [(_ceiling(1, 8, 0.5, 0.5), _ceiling(16, 8, 1.0, 1.0))] * 2
    result = CompareResult(
        rounds=rounds,
        ceiling_rounds=ceiling,
        idle={OURS: 0.0},
        yardstick_no_repack=False,
        ours_repacks=True,
        ceiling_commands=[["llama-batched-bench"]],
    )
    ratios = compute_ratios(rounds, (1, 16), ceiling)
    body = json.loads(json.dumps(compare_to_json(_settings(), result, ratios, {})))
    assert all(validate_report_json(report) == [] for report in body["reports"].values())
    assert all(validate_report_json(report) == [] for rounds in body["rounds"].values() for report in rounds)
    assert len(body["rounds"][OURS]) == 2
    assert body["ratios"][1]["ours_vs_llama_server"]["median"] == pytest.approx(1.0)
    assert body["ratios"][1]["ours_vs_ceiling"]["median"] == pytest.approx(128.0 / 64.0)
    assert body["ceiling_rounds"][0][1]["output_tokens_per_s"] == pytest.approx(64.0)
    assert body["settings"]["ctx_per_slot"] == 512
    assert body["settings"]["yardstick_no_repack"] is False and body["settings"]["rounds"] == 5


def test_schedule_alternates_within_and_across_rounds() -> None:
    members = (LLAMA_SERVER, OURS, CEILING)
    for n_levels in (1, 2, 3):
        schedule = round_schedule(members, n_levels, 4)
        assert len(schedule) == 4 * n_levels * len(members)
        for level in range(n_levels):
            firsts = [
                next(name for r, lv, name in schedule if r == rnd and lv == level) for rnd in range(4)
            ]  # who ran first at this level, round by round
            assert firsts.count(LLAMA_SERVER) == firsts.count(CEILING) == 2, (n_levels, level, firsts)
    assert [name for _, _, name in round_schedule((OURS, LLAMA_SERVER), 3, 1)] == [
        OURS, LLAMA_SERVER, LLAMA_SERVER, OURS, OURS, LLAMA_SERVER,
    ]  # fmt: skip


# Two lines as llama-batched-bench --output-format jsonl prints them, among its log lines.
BATCHED_BENCH_OUTPUT = (
    "main: n_kv_max = 8192, n_batch = 2048, n_ubatch = 512, flash_attn = -1\n"
    '{"n_kv_max": 8192, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, '
    '"n_threads": 2, "n_threads_batch": 2, "pp": 41, "tg": 64, "pl": 1, "n_kv": 105, "t_pp": 0.125000, '
    '"speed_pp": 328.000000, "t_tg": 0.500000, "speed_tg": 128.000000, "t": 0.625000, "speed": 168.000000}\n'
    '{"n_kv_max": 8192, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, '
    '"n_threads": 2, "n_threads_batch": 2, "pp": 41, "tg": 64, "pl": 16, "n_kv": 1680, "t_pp": 1.000000, '
    '"speed_pp": 656.000000, "t_tg": 3.000000, "speed_tg": 341.333333, "t": 4.000000, "speed": 420.000000}\n'
    '{"truncated":\n'
    "llama_perf_context_print:        load time =      50.00 ms\n"
)


def test_batched_bench_output_is_parsed_into_output_rates() -> None:
    single, sixteen = parse_batched_bench_output(BATCHED_BENCH_OUTPUT)
    assert (single.sequences, single.prompt_tokens, single.output_tokens) == (1, 41, 64)
    assert single.output_tokens_per_s == pytest.approx(64 / 0.625)
    assert single.decode_tokens_per_s == pytest.approx(128.0)
    assert sixteen.output_tokens_per_s == pytest.approx(16 * 64 / 4.0)
    assert sixteen.decode_tokens_per_s == pytest.approx(341.333, rel=1e-4)
    assert parse_batched_bench_output("no json here\n") == ()


def test_batched_bench_gets_the_servers_model_threads_and_slot_context() -> None:
    settings = _settings()
    command = batched_bench_command(Path("/b/llama-batched-bench"), settings, 16, 41, no_repack=False)
    assert command[0] == "/b/llama-batched-bench"
    assert command[command.index("--model") + 1] == "/models/smol.gguf"
    assert command[command.index("--threads") + 1] == command[command.index("--threads-batch") + 1] == "2"
    assert command[command.index("-npl") + 1] == "16"
    assert command[command.index("--ctx-size") + 1] == str(16 * 512)  # 512 per sequence, as per slot
    assert command[command.index("-npp") + 1] == "41" and command[command.index("-ntg") + 1] == "64"
    assert "--no-repack" not in command
    assert "--no-repack" in batched_bench_command(Path("/b/x"), settings, 1, 41, no_repack=True)
    assert batched_bench_binary(Path("/c/bin/llama-server")) == Path("/c/bin/llama-batched-bench")


def _with_prompts(report: LoadReport, prompt: float | None, computed: float | None) -> LevelSummary:
    return replace(report.levels[0], mean_prompt_tokens=prompt, mean_computed_prompt_tokens=computed)


def test_ceiling_prefills_what_our_server_computed() -> None:
    ours = _with_prompts(_report(OURS, 8, 1.0, (1,)), 41.0, 13.4)  # 28 of 41 tokens came from its cache
    reference = _with_prompts(_report(LLAMA_SERVER, 8, 1.0, (1,)), 41.0, 2.0)
    assert ceiling_prompt_tokens({OURS: ours, LLAMA_SERVER: reference}, 41, None) == 13
    assert ceiling_prompt_tokens({LLAMA_SERVER: reference}, 41, None) == 2
    fully_cached = _with_prompts(_report(OURS, 8, 1.0, (1,)), 41.0, 0.0)
    assert ceiling_prompt_tokens({OURS: fully_cached}, 41, None) == 1  # a decode needs one token
    silent = _with_prompts(_report(OURS, 8, 1.0, (1,)), None, None)
    assert ceiling_prompt_tokens({OURS: silent}, 41, None) == 41  # no usage details: the whole prompt
    assert ceiling_prompt_tokens({OURS: silent}, None, None) is None
    assert ceiling_prompt_tokens({OURS: ours}, 41, 7) == 7


def test_ceiling_decodes_over_the_whole_prompt_when_the_servers_cached_most_of_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Our server computed 1 of each request's 41 prompt tokens (its cache held the rest), so the ceiling
    prefills 1 token per sequence; but the servers' decode steps attend over all 41, so the ceiling's decode time
    comes from a second run that holds the whole prompt."""

    def fake_batched_bench(command: list[str], expected_levels: tuple[int, ...]) -> tuple[CeilingRun, ...]:
        n_prompt = int(command[command.index("-npp") + 1])
        sequences = int(command[command.index("-npl") + 1])
        decode_s = 3.0 if n_prompt == 1 else 3.1  # attention over 41 cached tokens makes each step slower
        return (CeilingRun(sequences, n_prompt, 64, prefill_s=0.01 * n_prompt, decode_s=decode_s),)

    monkeypatch.setattr("bench.compare.run_ceiling", fake_batched_bench)
    settings = _settings()
    plan = CeilingPlan(Path("/b/llama-batched-bench"), no_repack=False, full_prompt_tokens=41, override=None)
    commands: list[list[str]] = []
    run = measure_ceiling(plan, settings, 16, 1, commands)
    assert [command[command.index("-npp") + 1] for command in commands] == ["1", "41"]
    assert (run.prompt_tokens, run.context_tokens) == (1, 41)
    assert (run.prefill_s, run.decode_s) == (pytest.approx(0.01), 3.1)  # the short prefill, the long decode
    assert run.output_tokens_per_s == pytest.approx(16 * 64 / 3.11)
    (row,) = compute_ratios({}, (16,), [(run,)])
    assert row.ceiling_prompt_tokens == Spread(1, 1, 1, 1) and row.ceiling_context_tokens == Spread(41, 41, 41, 1)
    assert "ceil ctx" in format_ratios([row])

    commands.clear()  # the whole prompt computed: one run, its own decode
    whole = measure_ceiling(plan, settings, 16, 41, commands)
    assert len(commands) == 1 and whole.context_tokens is None and whole.decode_s == 3.1
    commands.clear()  # --ceiling-prompt-tokens: exactly what was asked, one run
    asked = measure_ceiling(replace(plan, override=1), settings, 16, 1, commands)
    assert len(commands) == 1 and asked.decode_s == 3.0
    with pytest.raises(CompareError, match="different shapes"):
        with_cached_prompt(run, replace(run, sequences=1))


def test_yardstick_weight_layout_follows_our_servers_verdict() -> None:
    log = "INFO server.boot.loader: extra buffer types: on (probe passed in 0.3 s)\n"
    assert ours_repacks(log) is True
    assert ours_repacks("WARNING x: extra buffer types off: child died with SIGSEGV\n") is False
    assert ours_repacks("INFO uvicorn running\n") is None
    assert yardstick_no_repack("auto", True) is False
    assert yardstick_no_repack("auto", False) is True
    assert yardstick_no_repack("on", False) is False and yardstick_no_repack("off", True) is True
    with pytest.raises(CompareError):
        yardstick_no_repack("sometimes", None)


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


# /proc/cpuinfo flags lines (trimmed to the ISA part) of the CPUs these benchmarks have met.
ZEN4_FLAGS = (
    "fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c bmi1 avx2 bmi2 avx512f avx512dq avx512ifma avx512cd avx512bw "
    "avx512vl avx512_bf16 avx512vbmi avx512_vbmi2 gfni vaes avx512_vnni avx512_bitalg avx512_vpopcntdq"
)
ZEN5_FLAGS = f"{ZEN4_FLAGS} avx_vnni avx512_vp2intersect"
SAPPHIRE_RAPIDS_FLAGS = f"{ZEN5_FLAGS} amx_bf16 avx512_fp16 amx_tile amx_int8"


def _cpuinfo(flags: str, n_processors: int = 2) -> str:
    return "".join(f"processor\t: {i}\nmodel name\t: X\nflags\t\t: {flags}\n\n" for i in range(n_processors))


def _options(flags: str) -> dict[str, str]:
    options = cpu_build_options(cpu_flags(_cpuinfo(flags)))
    return dict(option.removeprefix("-D").split("=") for option in options)


def test_build_options_follow_the_cpus_flags_exactly() -> None:
    zen4 = _options(ZEN4_FLAGS)
    assert zen4["GGML_NATIVE"] == "OFF"  # nothing the compiler guesses on top
    assert zen4["GGML_AVX_VNNI"] == "OFF"  # AVX512-VNNI is not AVX-VNNI: ON would die with SIGILL on Zen 4
    for option in ("GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2", "GGML_AVX512", "GGML_AVX512_VNNI"):
        assert zen4[option] == "ON", option
    assert zen4["GGML_AVX512_VBMI"] == zen4["GGML_AVX512_BF16"] == "ON"
    assert _options(ZEN5_FLAGS)["GGML_AVX_VNNI"] == "ON"
    sapphire = _options(SAPPHIRE_RAPIDS_FLAGS)
    assert sapphire["GGML_AVX_VNNI"] == "ON"
    assert sapphire["GGML_AMX_TILE"] == sapphire["GGML_AMX_INT8"] == sapphire["GGML_AMX_BF16"] == "OFF"
    avx2_only = _options("fpu sse sse2 ssse3 sse4_2 avx f16c fma bmi2 avx2")
    assert avx2_only["GGML_AVX2"] == "ON"
    assert {avx2_only[name] for name in avx2_only if name.startswith("GGML_AVX512")} == {"OFF"}
    # AVX-512 without BW/VL (Knights Landing) cannot run what GGML_AVX512 compiles.
    assert _options("sse4_2 avx avx2 fma f16c avx512f avx512cd avx512_vnni")["GGML_AVX512_VNNI"] == "OFF"
    assert cpu_build_options(frozenset()) == ("-DGGML_NATIVE=ON",)  # no x86 flags: the compiler decides


def test_cpu_flags_are_those_every_processor_lists() -> None:
    text = _cpuinfo(ZEN5_FLAGS, 1) + _cpuinfo(ZEN4_FLAGS, 1)
    assert "avx_vnni" not in cpu_flags(text) and "avx512_vnni" in cpu_flags(text)
    assert cpu_flags("processor\t: 0\nFeatures\t: fp asimd\n") == frozenset()
    this_cpu = this_cpu_build_options()
    assert "-DGGML_AMX_TILE=ON" not in this_cpu and all(option.startswith("-DGGML_") for option in this_cpu)


def test_build_commands_build_the_server_and_batched_bench(tmp_path: Path) -> None:
    cpu = cpu_build_options(cpu_flags(_cpuinfo(ZEN4_FLAGS)))
    configure = cmake_configure_command(tmp_path / "src", tmp_path / "build", "Ninja", cpu)
    for option in (
        "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DCMAKE_BUILD_TYPE=Release",
    ):
        assert option in configure
    assert set(CMAKE_OPTIONS) <= set(configure) and set(cpu) <= set(configure)
    assert configure[-2:] == ["-G", "Ninja"]
    build = cmake_build_command(tmp_path / "build", 2)
    assert build[-5:] == ["--target", "llama-server", "llama-batched-bench", "-j", "2"]


def test_cached_binaries_are_reused_without_building(tmp_path: Path) -> None:
    layout = cache_layout(cache_root=tmp_path)
    assert layout.root == tmp_path / "llama-server-0.3.36"
    assert layout.build_dir.name == f"build-{build_key(this_cpu_build_options())}"
    layout.binary.parent.mkdir(parents=True)
    layout.binary.write_text("#!/bin/sh\n")
    with pytest.raises(LlamaServerError, match="CMakeLists"):  # llama-batched-bench is missing: build
        ensure_llama_server(source_dir=tmp_path / "absent", cache_root=tmp_path)
    layout.batched_bench.write_text("#!/bin/sh\n")
    # A source dir that does not exist proves nothing is configured or built.
    assert ensure_llama_server(source_dir=tmp_path / "absent", cache_root=tmp_path) == layout.binary
    assert batched_bench_binary(layout.binary) == layout.batched_bench


def test_build_folder_depends_on_the_cpu_options(tmp_path: Path) -> None:
    zen4 = cpu_build_options(cpu_flags(_cpuinfo(ZEN4_FLAGS)))
    zen5 = cpu_build_options(cpu_flags(_cpuinfo(ZEN5_FLAGS)))
    assert (
        cache_layout(cache_root=tmp_path, cpu_options=zen4).build_dir
        != cache_layout(cache_root=tmp_path, cpu_options=zen5).build_dir
    )
    assert build_key(zen4) == build_key(tuple(reversed(zen4)))


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
