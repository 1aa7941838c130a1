"""Side-by-side load benchmark: our server against llama.cpp's C++ llama-server, with llama-cpp-python's
own server as the lower anchor and llama.cpp's `llama-batched-bench` as the ceiling. Same model, threads,
slots and context; same requests.

    python -m bench.compare                          # SmolLM2, 2 threads, 16 slots, levels 1,4,16, 5 rounds
    python -m bench.compare --servers llama-server,llama-cpp-python --concurrency 1,4 --max-tokens 16

All servers are started first (each on a free loopback port), then `--rounds` rounds run: in each round
every concurrency level runs against each server in turn, the order reversed at every level and every
round, so a change in machine load hits all of them alike. Each figure is the median over the rounds
with its min–max spread; ratios are medians of per-round ratios (both sides measured minutes apart).

The yardstick uses the same weight layout as ours: llama-server and llama-batched-bench run with their
defaults (weights repacked) unless our server's extra-buffer-types probe turned repacking off, which its
log says (`--yardstick-repack` overrides). Both are built once from the pinned llama-cpp-python sdist for
exactly this CPU's instruction set (see bench.llama_server). The ceiling is llama-batched-bench, run right
after the servers at each level: `concurrency` sequences, each prefilling as many prompt tokens as our
server computed per request at that level in that round (its usage: prompt minus cached tokens; both
servers reuse cached prompt prefixes), then `--max-tokens` decode steps together; no HTTP, no client.
The decode steps attend over the whole prompt, cached or not, as the servers' do: where the prefill is
shorter than the prompt, the decode time comes from a second run that prefills the whole prompt ("ceil ctx").
Its figure is output tokens / (prefill + decode time); "ceil decode" is the decode steps alone. The "ours"
command line is a template (--ours-command) so it follows the server's CLI as it evolves.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.llama_server import (
    LlamaServerError,
    LlamaServerSettings,
    batched_bench_binary,
    ensure_llama_server,
    llama_server_spec,
    this_cpu_build_options,
    this_cpu_has_amx,
)
from bench.load import (
    DEFAULT_PROMPTS_PATH,
    LoadError,
    LoadPlan,
    discover_model,
    format_reports,
    json_schema_format,
    load_prompts,
    parse_levels,
    plot_reports,
    requests_for_levels,
    run_load,
    write_json,
)
from bench.process import RunningServer, ServerSpec, ServerStartError, exit_on_termination, run_server
from bench.stats import REPORT_SCHEMA_VERSION, LevelSummary, LoadReport, report_to_json

REPO_ROOT = Path(__file__).resolve().parent.parent
LLAMA_SERVER = "llama-server"
OURS = "ours"
LLAMA_CPP_PYTHON = "llama-cpp-python"
CEILING = "llama-batched-bench"
KNOWN_SERVERS = (LLAMA_SERVER, OURS, LLAMA_CPP_PYTHON)
DEFAULT_OURS_COMMAND = (
    "{python} -m server --model {model} --host {host} --port {port} --parallel {parallel} "
    "--threads {threads} --ctx-size {ctx_per_slot}"
)
HOST = "127.0.0.1"
DEFAULT_ROUNDS = 5
IDLE_CPU_SAMPLE_S = 1.0
# An idle server burning more than this much CPU would slow down whichever server is being measured.
IDLE_CPU_WARN_PERCENT = 5.0
# A 1-minute load average above this fraction of the CPU count means someone else is computing.
BUSY_LOAD_FRACTION = 0.5
REPACK_CHOICES = ("auto", "on", "off")
# What our server logs once it has decided (server.boot.loader): "extra buffer types: on (probe passed ...)".
_OURS_BUFTS_LOG = re.compile(r"extra buffer types:? (on|off)\b")
OURS_VERDICT_WAIT_S = 5.0
CEILING_TIMEOUT_S = 600.0


class CompareError(RuntimeError):
    """Bad arguments or a server that could not be started; printed as one line."""


@dataclass(frozen=True)
class CompareSettings:
    model: str
    model_path: Path
    threads: int
    parallel: int
    # Context of one slot (prompt + output). llama-server's --ctx-size is the total, split over its slots.
    ctx_per_slot: int
    concurrency_levels: tuple[int, ...]
    requests_per_level: tuple[int, ...]
    max_tokens: int
    servers: tuple[str, ...]
    ours_command: str
    ours_health_path: str
    anchor_ban_eos: bool
    rounds: int = DEFAULT_ROUNDS
    # "auto": the yardstick repacks weights exactly when our server does; "on"/"off" force it.
    yardstick_repack: str = "auto"
    ceiling: bool = True
    # Prompt length given to llama-batched-bench; None: the servers' mean chat prompt, asked of llama-server.
    ceiling_prompt_tokens: int | None = None
    # Every request constrained to this response_format (a json_schema workload); the ceiling has no grammar,
    # so it is not run then.
    response_format: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Spread:
    """Median of a figure over the rounds, with the lowest and highest value seen."""

    median: float
    low: float
    high: float
    n: int

    @staticmethod
    def of(values: Sequence[float | None]) -> Spread | None:
        seen = [value for value in values if value is not None]
        if not seen:
            return None
        return Spread(median=statistics.median(seen), low=min(seen), high=max(seen), n=len(seen))


@dataclass(frozen=True)
class CeilingRun:
    """One llama-batched-bench measurement: `sequences` prompts of prompt_tokens, then output_tokens each."""

    sequences: int
    prompt_tokens: int
    output_tokens: int
    prefill_s: float
    decode_s: float
    # Prompt tokens in each sequence's KV cache during its decode steps: the whole prompt, of which only
    # prompt_tokens were prefilled (the rest a server's prompt cache held); None: prompt_tokens.
    context_tokens: int | None = None

    @property
    def output_tokens_per_s(self) -> float:
        """Comparable with a server's aggregate output rate: prefill time counts too."""
        total_s = self.prefill_s + self.decode_s
        return self.sequences * self.output_tokens / total_s if total_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.sequences * self.output_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass(frozen=True)
class LevelRatio:
    """How our server compares at one concurrency level over the rounds (None where a side is missing)."""

    concurrency: int
    ours_tok_s: Spread | None
    llama_server_tok_s: Spread | None
    llama_cpp_python_tok_s: Spread | None
    ceiling_tok_s: Spread | None
    ceiling_decode_tok_s: Spread | None
    ceiling_prompt_tokens: Spread | None  # the prefill per sequence the ceiling was given
    ceiling_context_tokens: Spread | None  # the prompt its decode steps attended over (cached or prefilled)
    # Ratios of the same round's figures, so slow drift of the machine cancels out.
    ours_vs_llama_server: Spread | None
    ours_vs_llama_cpp_python: Spread | None
    ours_vs_ceiling: Spread | None
    llama_server_vs_ceiling: Spread | None
    ours_ttft_p50_ms: Spread | None
    llama_server_ttft_p50_ms: Spread | None


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def parse_servers(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in KNOWN_SERVERS]
    if not names or unknown:
        raise CompareError(f"--servers takes a comma-separated subset of {','.join(KNOWN_SERVERS)}, got {text!r}")
    return tuple(dict.fromkeys(names))


def ours_command(template: str, settings: CompareSettings, port: int) -> tuple[str, ...]:
    """Fill the --ours-command template; each placeholder is substituted inside one shell word."""
    values = {
        "python": sys.executable,
        "model": settings.model,
        "model_path": str(settings.model_path),
        "host": HOST,
        "port": str(port),
        "parallel": str(settings.parallel),
        "threads": str(settings.threads),
        "ctx_per_slot": str(settings.ctx_per_slot),
        "ctx_total": str(settings.ctx_per_slot * settings.parallel),
    }
    try:
        return tuple(word.format(**values) for word in shlex.split(template))
    except (KeyError, IndexError, ValueError) as exc:
        known = ", ".join("{" + name + "}" for name in values)
        raise CompareError(f"--ours-command has a bad placeholder ({exc}); known: {known}") from None


def ours_spec(settings: CompareSettings, port: int) -> ServerSpec:
    return ServerSpec(
        name=OURS,
        command=ours_command(settings.ours_command, settings, port),
        base_url=f"http://{HOST}:{port}/v1",
        health_url=f"http://{HOST}:{port}{settings.ours_health_path}",
        cwd=REPO_ROOT,  # `python -m server` must find the repository's package
    )


def llama_cpp_python_spec(settings: CompareSettings, port: int) -> ServerSpec:
    """llama-cpp-python's server: one sequence at a time, so it gets one slot's context."""
    command = (
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(settings.model_path),
        "--host", HOST,
        "--port", str(port),
        "--n_threads", str(settings.threads),
        "--n_threads_batch", str(settings.threads),
        "--n_ctx", str(settings.ctx_per_slot),
        # By default it cuts a running stream short when the next request arrives; queue instead.
        "--interrupt_requests", "False",
    )  # fmt: skip
    # It has no /health; /v1/models answers once the model is loaded.
    return ServerSpec(
        name=LLAMA_CPP_PYTHON,
        command=command,
        base_url=f"http://{HOST}:{port}/v1",
        health_url=f"http://{HOST}:{port}/v1/models",
    )


def eos_token_id(model_path: Path) -> int | None:
    """The GGUF's end-of-sequence token, banned for llama-cpp-python, which has no ignore_eos."""
    from gguf import GGUFReader

    field = GGUFReader(model_path).fields.get("tokenizer.ggml.eos_token_id")
    return None if field is None else int(field.contents())


def level_order(servers: Sequence[str], level_index: int) -> tuple[str, ...]:
    """Alternate the order at every level (A B C, C B A, ...) so no server always goes first."""
    return tuple(servers) if level_index % 2 == 0 else tuple(reversed(servers))


def round_schedule(servers: Sequence[str], n_levels: int, n_rounds: int) -> list[tuple[int, int, str]]:
    """(round, level index, server) in running order: the order flips at every step, levels and rounds alike,
    so that over the rounds each server runs first as often as last at every level."""
    schedule = []
    step = 0
    for round_index in range(n_rounds):
        for level_index in range(n_levels):
            schedule += [(round_index, level_index, name) for name in level_order(servers, step)]
            step += 1
        if n_levels % 2 == 0:
            step += 1  # otherwise a round with an even number of levels would repeat the last one's order
    return schedule


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def _level(report: LoadReport | None, concurrency: int) -> LevelSummary | None:
    if report is None:
        return None
    return next((level for level in report.levels if level.concurrency == concurrency), None)


def _rate(report: LoadReport | None, concurrency: int) -> float | None:
    level = _level(report, concurrency)
    return level.output_tokens_per_s if level is not None and level.n_ok else None


def _ttft(report: LoadReport | None, concurrency: int) -> float | None:
    level = _level(report, concurrency)
    return level.ttft_p50_ms if level is not None else None


def _ceiling_run(runs: Sequence[CeilingRun], concurrency: int) -> CeilingRun | None:
    return next((run for run in runs if run.sequences == concurrency), None)


def with_cached_prompt(prefill: CeilingRun, decode: CeilingRun) -> CeilingRun:
    """The ceiling of servers whose prompt cache held part of each prompt: the prefill of `prefill` (a run
    given only the computed tokens) and the decode steps of `decode` (a run given the whole prompt), whose
    attention covers the cached prompt as the servers' decodes do (SmolLM2 at 16 streams, a 39-token prompt:
    ~3% slower steps than with one token)."""
    if (prefill.sequences, prefill.output_tokens) != (decode.sequences, decode.output_tokens):
        raise CompareError(f"llama-batched-bench runs of different shapes cannot be combined: {prefill}, {decode}")
    return replace(prefill, decode_s=decode.decode_s, context_tokens=decode.prompt_tokens)


def compute_ratios(
    rounds: Mapping[str, Sequence[LoadReport]],
    levels: Sequence[int],
    ceiling_rounds: Sequence[Sequence[CeilingRun]] = (),
) -> tuple[LevelRatio, ...]:
    """Per level: each server's median rate and spread over the rounds, and per-round ratios' spread.

    rounds: per server, one report per round (round i of every server ran within minutes of each other);
    ceiling_rounds: the llama-batched-bench runs of each round.
    """
    n_rounds = max([len(reports) for reports in rounds.values()] + [len(ceiling_rounds)], default=0)

    def per_round(name: str, pick: Callable[[LoadReport | None, int], float | None], level: int) -> list[float | None]:
        reports = rounds.get(name, ())
        return [pick(reports[i] if i < len(reports) else None, level) for i in range(n_rounds)]

    rows = []
    for concurrency in levels:
        ours = per_round(OURS, _rate, concurrency)
        reference = per_round(LLAMA_SERVER, _rate, concurrency)
        anchor = per_round(LLAMA_CPP_PYTHON, _rate, concurrency)
        ceiling_runs = [
            _ceiling_run(ceiling_rounds[i], concurrency) if i < len(ceiling_rounds) else None for i in range(n_rounds)
        ]
        ceiling = [run.output_tokens_per_s if run is not None else None for run in ceiling_runs]
        rows.append(
            LevelRatio(
                concurrency=concurrency,
                ours_tok_s=Spread.of(ours),
                llama_server_tok_s=Spread.of(reference),
                llama_cpp_python_tok_s=Spread.of(anchor),
                ceiling_tok_s=Spread.of(ceiling),
                ceiling_decode_tok_s=Spread.of([run.decode_tokens_per_s if run else None for run in ceiling_runs]),
                ceiling_prompt_tokens=Spread.of([run.prompt_tokens if run else None for run in ceiling_runs]),
                ceiling_context_tokens=Spread.of(
                    [(run.context_tokens or run.prompt_tokens) if run else None for run in ceiling_runs]
                ),
                ours_vs_llama_server=Spread.of([ratio(a, b) for a, b in zip(ours, reference, strict=True)]),
                ours_vs_llama_cpp_python=Spread.of([ratio(a, b) for a, b in zip(ours, anchor, strict=True)]),
                ours_vs_ceiling=Spread.of([ratio(a, b) for a, b in zip(ours, ceiling, strict=True)]),
                llama_server_vs_ceiling=Spread.of([ratio(a, b) for a, b in zip(reference, ceiling, strict=True)]),
                ours_ttft_p50_ms=Spread.of(per_round(OURS, _ttft, concurrency)),
                llama_server_ttft_p50_ms=Spread.of(per_round(LLAMA_SERVER, _ttft, concurrency)),
            )
        )
    return tuple(rows)


def _fmt(value: Spread | None, spec: str, spread: bool = True) -> str:
    if value is None:
        return "-"
    median = format(value.median, spec)
    if not spread or value.n < 2:
        return median
    return f"{median} ({format(value.low, spec)}–{format(value.high, spec)})"


def format_ratios(ratios: Sequence[LevelRatio]) -> str:
    """Medians over the rounds with (min–max); ratios are medians of same-round ratios."""
    columns: tuple[tuple[str, int, Callable[[LevelRatio], str]], ...] = (
        ("conc", 4, lambda row: str(row.concurrency)),
        ("ours tok/s", 22, lambda row: _fmt(row.ours_tok_s, ".1f")),
        ("llama-server", 22, lambda row: _fmt(row.llama_server_tok_s, ".1f")),
        ("llama-cpp-py", 20, lambda row: _fmt(row.llama_cpp_python_tok_s, ".1f")),
        ("ceiling", 22, lambda row: _fmt(row.ceiling_tok_s, ".1f")),
        ("ceil pp", 7, lambda row: _fmt(row.ceiling_prompt_tokens, ".0f", spread=False)),
        ("ceil ctx", 8, lambda row: _fmt(row.ceiling_context_tokens, ".0f", spread=False)),
        ("ceil decode", 11, lambda row: _fmt(row.ceiling_decode_tok_s, ".1f", spread=False)),
        ("ours/l-s", 18, lambda row: _fmt(row.ours_vs_llama_server, ".2f")),
        ("ours/ceil", 18, lambda row: _fmt(row.ours_vs_ceiling, ".2f")),
        ("l-s/ceil", 18, lambda row: _fmt(row.llama_server_vs_ceiling, ".2f")),
        ("ours/l-c-p", 10, lambda row: _fmt(row.ours_vs_llama_cpp_python, ".2f", spread=False)),
        ("TTFT p50 ours/l-s ms", 20, lambda row: f"{_fmt(row.ours_ttft_p50_ms, '.0f', spread=False)} / "
         f"{_fmt(row.llama_server_ttft_p50_ms, '.0f', spread=False)}"),
    )  # fmt: skip
    lines = [" ".join(f"{title:>{width}}" for title, width, _ in columns)]
    lines += [" ".join(f"{cell(row):>{width}}" for _, width, cell in columns) for row in ratios]
    return "\n".join(lines)


def machine_description() -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.partition(":")[2].strip()
                break
    return {
        "cpu": cpu_model,
        "n_cpus": os.cpu_count(),
        "amx": this_cpu_has_amx(),
        "llama_cpp_build_options": list(this_cpu_build_options()),
        "load_average_at_start": list(os.getloadavg()),
    }


def warn_if_busy(machine: dict[str, Any]) -> None:
    """Other processes take whole cores from a 2-thread llama.cpp run: say so before measuring."""
    load_1min = machine["load_average_at_start"][0]
    n_cpus = machine["n_cpus"] or 1
    if load_1min > BUSY_LOAD_FRACTION * n_cpus:
        print(
            f"warning: load average {load_1min:.1f} on {n_cpus} CPUs: other work is running, "
            "so these numbers are not a fair measurement",
            flush=True,
        )


def idle_cpu_percent(process_id: int, sample_s: float = IDLE_CPU_SAMPLE_S) -> float:
    """CPU used by a server and its children while no request is running (100 = one core)."""
    try:
        processes = [psutil.Process(process_id), *psutil.Process(process_id).children(recursive=True)]
        before = [process.cpu_times() for process in processes]
        time.sleep(sample_s)
        after = [process.cpu_times() for process in processes]
    except psutil.Error:
        return 0.0
    used = sum((a.user + a.system) - (b.user + b.system) for a, b in zip(after, before, strict=True))
    return 100.0 * used / sample_s


def ours_repacks(log_text: str) -> bool | None:
    """Our server's extra-buffer-types verdict (repacked weights or not) from its log; None if not logged."""
    found = _OURS_BUFTS_LOG.findall(log_text)
    return None if not found else found[-1] == "on"


def yardstick_no_repack(setting: str, ours_verdict: bool | None) -> bool:
    """Whether llama-server and llama-batched-bench get --no-repack: the same weight layout as ours.

    "auto" follows our server's verdict; when it is unknown (ours not run) they keep llama.cpp's default
    (repacked), except on an AMX CPU, where llama.cpp's repacked path is the broken one.
    """
    if setting not in REPACK_CHOICES:
        raise CompareError(f"--yardstick-repack takes one of {', '.join(REPACK_CHOICES)}, got {setting!r}")
    if setting != "auto":
        return setting == "off"
    if ours_verdict is not None:
        return not ours_verdict
    return this_cpu_has_amx()


def wait_for_ours_verdict(log_path: Path, timeout_s: float = OURS_VERDICT_WAIT_S) -> bool | None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError):
            verdict = ours_repacks(log_path.read_text(errors="replace"))
            if verdict is not None:
                return verdict
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def server_spec(
    name: str, settings: CompareSettings, llama_server_binary: Path | None, no_repack: bool = False
) -> ServerSpec:
    port = free_port()
    if name == OURS:
        return ours_spec(settings, port)
    if name == LLAMA_CPP_PYTHON:
        return llama_cpp_python_spec(settings, port)
    assert llama_server_binary is not None
    return llama_server_spec(
        LlamaServerSettings(
            binary=llama_server_binary,
            model_path=settings.model_path,
            port=port,
            threads=settings.threads,
            parallel=settings.parallel,
            ctx_size=settings.ctx_per_slot * settings.parallel,
            host=HOST,
            no_repack=no_repack,
        )
    )


def ceiling_levels(settings: CompareSettings) -> tuple[int, ...]:
    """The concurrency levels llama-batched-bench can reproduce: at most one sequence per slot."""
    return tuple(level for level in settings.concurrency_levels if level <= settings.parallel)


def batched_bench_command(
    binary: Path, settings: CompareSettings, sequences: int, prompt_tokens: int, no_repack: bool
) -> list[str]:
    """llama-batched-bench with the servers' model and threads: `sequences` prompts of prompt_tokens, then
    max_tokens decode steps of all of them together.

    Its context is split over the sequences (no unified KV, as in both servers), so each gets ctx_per_slot,
    as a slot does.
    """
    command = [
        str(binary),
        "--model", str(settings.model_path),
        "--threads", str(settings.threads),
        "--threads-batch", str(settings.threads),
        "--ctx-size", str(settings.ctx_per_slot * sequences),
        "-npp", str(prompt_tokens),
        "-ntg", str(settings.max_tokens),
        "-npl", str(sequences),
        "--output-format", "jsonl",
    ]  # fmt: skip
    if no_repack:
        command.append("--no-repack")
    return command


def parse_batched_bench_output(text: str) -> tuple[CeilingRun, ...]:
    """The measurements in llama-batched-bench's `--output-format jsonl` output (other lines ignored)."""
    runs = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            row = json.loads(line)
            runs.append(
                CeilingRun(
                    sequences=int(row["pl"]),
                    prompt_tokens=int(row["pp"]),
                    output_tokens=int(row["tg"]),
                    prefill_s=float(row["t_pp"]),
                    decode_s=float(row["t_tg"]),
                )
            )
        except (ValueError, KeyError, TypeError):
            continue
    return tuple(runs)


def ceiling_prompt_tokens(
    level_reports: Mapping[str, LevelSummary | None], full_prompt_tokens: int | None, override: int | None
) -> int | None:
    """The prompt length the ceiling prefills at one level: as many tokens as our server computed per request
    in the same round (what its prompt cache did not hold), else llama-server's, else the whole prompt."""
    if override is not None:
        return override
    for name in (OURS, LLAMA_SERVER):
        level = level_reports.get(name)
        if level is not None and level.mean_computed_prompt_tokens is not None:
            return max(1, round(level.mean_computed_prompt_tokens))
    return full_prompt_tokens


def run_ceiling(command: Sequence[str], expected_levels: Sequence[int]) -> tuple[CeilingRun, ...]:
    completed = subprocess.run(list(command), capture_output=True, text=True, check=False, timeout=CEILING_TIMEOUT_S)
    runs = parse_batched_bench_output(completed.stdout + "\n" + completed.stderr)
    missing = sorted(set(expected_levels) - {run.sequences for run in runs})
    if completed.returncode != 0 or missing:
        tail = (completed.stderr or completed.stdout)[-1500:]
        raise CompareError(
            f"llama-batched-bench exited with {completed.returncode}, no result for {missing}; output tail:\n{tail}"
        )
    return runs


async def chat_prompt_tokens(llama_server_base_url: str, prompts: Sequence[str]) -> int:
    """The servers' mean prompt length in tokens: llama-server's own chat template and tokenizer."""
    root = llama_server_base_url.removesuffix("/v1")
    lengths = []
    async with httpx.AsyncClient(timeout=30.0, trust_env=False) as client:
        for prompt in prompts:
            rendered = await client.post(
                f"{root}/apply-template", json={"messages": [{"role": "user", "content": prompt}]}
            )
            rendered.raise_for_status()
            tokens = await client.post(
                f"{root}/tokenize", json={"content": rendered.json()["prompt"], "add_special": True}
            )
            tokens.raise_for_status()
            lengths.append(len(tokens.json()["tokens"]))
    return round(statistics.mean(lengths))


def merge_level_reports(label: str, parts: Sequence[LoadReport]) -> LoadReport:
    """One report per server out of its single-level runs (run one level at a time to alternate)."""
    levels = tuple(level for part in parts for level in part.levels)
    first = parts[0].settings
    settings = replace(
        first,
        concurrency_levels=tuple(level.concurrency for level in levels),
        requests_per_level=tuple(level.n_requests for level in levels),
        sent_ignore_eos=all(part.settings.sent_ignore_eos for part in parts),
    )
    return LoadReport(label=label, settings=settings, levels=levels)


def median_report(label: str, rounds: Sequence[LoadReport]) -> LoadReport:
    """One report whose every level is the round with that level's median output rate (lower median for
    an even count): a real measurement, so its TTFT and ITL belong to the throughput shown."""
    levels = []
    for concurrency in (level.concurrency for level in rounds[0].levels):
        seen = sorted(
            (level for report in rounds for level in report.levels if level.concurrency == concurrency),
            key=lambda level: level.output_tokens_per_s,
        )
        levels.append(seen[(len(seen) - 1) // 2])
    return replace(rounds[0], label=label, levels=tuple(levels))


@dataclass
class CompareResult:
    # Per server, one report per round.
    rounds: dict[str, list[LoadReport]]
    # Per round, llama-batched-bench's runs (empty without a ceiling).
    ceiling_rounds: list[tuple[CeilingRun, ...]]
    idle: dict[str, float]
    yardstick_no_repack: bool
    ours_repacks: bool | None
    # One llama-batched-bench command line per ceiling run, in order.
    ceiling_commands: list[list[str]]


@dataclass(frozen=True)
class CeilingPlan:
    """How to run the ceiling: the binary, the weight layout, and the whole chat prompt's length (the
    prefill when neither server reports its prompt cache); override: --ceiling-prompt-tokens."""

    binary: Path
    no_repack: bool
    full_prompt_tokens: int | None
    override: int | None


async def _run_rounds(
    running: dict[str, RunningServer],
    settings: CompareSettings,
    prompts: tuple[str, ...],
    show_progress: bool,
    ceiling: CeilingPlan | None,
) -> tuple[dict[str, list[LoadReport]], list[tuple[CeilingRun, ...]], list[list[str]]]:
    models = {name: await discover_model(server.spec.base_url) for name, server in running.items()}
    banned = eos_token_id(settings.model_path) if settings.anchor_ban_eos else None
    parts: dict[str, list[list[LoadReport]]] = {name: [[] for _ in range(settings.rounds)] for name in running}
    ceiling_rounds: list[list[CeilingRun]] = [[] for _ in range(settings.rounds)]
    ceiling_commands: list[list[str]] = []
    levels = tuple(zip(settings.concurrency_levels, settings.requests_per_level, strict=True))
    schedule = round_schedule(tuple(running), len(levels), settings.rounds)
    for step, (round_index, level_index, name) in enumerate(schedule):
        concurrency, n_requests = levels[level_index]
        plan = LoadPlan(
            base_url=running[name].spec.base_url,
            model=models[name],
            prompts=prompts,
            max_tokens=settings.max_tokens,
            concurrency_levels=(concurrency,),
            requests_per_level=(n_requests,),
            banned_token_ids=(banned,) if name == LLAMA_CPP_PYTHON and banned is not None else (),
            response_format=settings.response_format,
        )
        label = f"{name} r{round_index + 1}" if settings.rounds > 1 else name
        parts[name][round_index].append(await run_load(plan, label, show_progress=show_progress))
        level_done = step + 1 == len(schedule) or schedule[step + 1][:2] != (round_index, level_index)
        if ceiling is not None and level_done and concurrency <= settings.parallel:
            # Right after the servers at this level, with the prefill our server did in this round.
            this_level = {member: part[round_index][-1].levels[0] for member, part in parts.items()}
            prompt_tokens = ceiling_prompt_tokens(this_level, ceiling.full_prompt_tokens, ceiling.override)
            if prompt_tokens is not None:
                ceiling_rounds[round_index].append(
                    measure_ceiling(ceiling, settings, concurrency, prompt_tokens, ceiling_commands)
                )
    rounds = {name: [merge_level_reports(name, part) for part in per_round] for name, per_round in parts.items()}
    return rounds, [tuple(runs) for runs in ceiling_rounds], ceiling_commands


def measure_ceiling(
    ceiling: CeilingPlan, settings: CompareSettings, concurrency: int, prompt_tokens: int, commands: list[list[str]]
) -> CeilingRun:
    """One level's ceiling: prefilling `prompt_tokens` per sequence, decoding over the whole prompt (a second
    run when the prefill was shorter; --ceiling-prompt-tokens sets both)."""

    def measure(n_prompt: int) -> CeilingRun:
        command = batched_bench_command(ceiling.binary, settings, concurrency, n_prompt, ceiling.no_repack)
        commands.append(command)
        run = _ceiling_run(run_ceiling(command, (concurrency,)), concurrency)
        assert run is not None  # run_ceiling raises when the level is missing
        return run

    prefill = measure(prompt_tokens)
    whole = ceiling.full_prompt_tokens
    if ceiling.override is not None or whole is None or whole <= prompt_tokens:
        return prefill
    return with_cached_prompt(prefill, measure(whole))


def run_compare(
    settings: CompareSettings, prompts: tuple[str, ...], source_dir: Path | None, log_dir: Path, show_progress: bool
) -> CompareResult:
    """Start every server, run the alternating rounds (and the ceiling), stop them."""
    need_build = LLAMA_SERVER in settings.servers or settings.ceiling
    binary = ensure_llama_server(source_dir) if need_build else None
    # Ours first: its log tells the yardstick which weight layout to use.
    start_order = sorted(settings.servers, key=lambda name: name != OURS)
    with contextlib.ExitStack() as stack:
        running: dict[str, RunningServer] = {}
        verdict: bool | None = None
        no_repack = yardstick_no_repack(settings.yardstick_repack, None)
        for name in start_order:
            spec = server_spec(name, settings, binary, no_repack=no_repack)
            print(f"starting {name} (log in {log_dir}): {shlex.join(spec.command)}", flush=True)
            running[name] = stack.enter_context(run_server(spec, log_dir=log_dir))
            if name == OURS:
                verdict = wait_for_ours_verdict(running[name].log_path)
                no_repack = yardstick_no_repack(settings.yardstick_repack, verdict)
                said = "not logged" if verdict is None else "repacked" if verdict else "not repacked"
                print(f"our weights: {said}; yardstick runs {'--no-repack' if no_repack else 'repacked'}", flush=True)
        running = {name: running[name] for name in settings.servers}  # back to the requested order
        ceiling = None
        if settings.ceiling and ceiling_levels(settings):
            assert binary is not None
            full_prompt = None
            if LLAMA_SERVER in running:
                full_prompt = asyncio.run(chat_prompt_tokens(running[LLAMA_SERVER].spec.base_url, prompts))
            ceiling = CeilingPlan(batched_bench_binary(binary), no_repack, full_prompt, settings.ceiling_prompt_tokens)
            print(f"ceiling: {ceiling.binary} (whole chat prompt: {full_prompt} tokens)", flush=True)
        idle = {name: idle_cpu_percent(server.process.pid) for name, server in running.items()}
        for name, percent in idle.items():
            if percent > IDLE_CPU_WARN_PERCENT:
                print(f"warning: idle {name} uses {percent:.0f}% CPU, which slows the others down", flush=True)
        rounds, ceiling_rounds, ceiling_commands = asyncio.run(
            _run_rounds(running, settings, prompts, show_progress, ceiling)
        )
    return CompareResult(
        rounds=rounds,
        ceiling_rounds=ceiling_rounds,
        idle=idle,
        yardstick_no_repack=no_repack,
        ours_repacks=verdict,
        ceiling_commands=ceiling_commands,
    )


def _spread_json(value: Spread | None) -> dict[str, float] | None:
    return None if value is None else asdict(value)


def compare_to_json(
    settings: CompareSettings,
    result: CompareResult,
    ratios: Sequence[LevelRatio],
    machine: dict[str, Any],
) -> dict[str, Any]:
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "machine": machine,
        "settings": {
            "model": settings.model,
            "model_path": str(settings.model_path),
            "threads": settings.threads,
            "parallel": settings.parallel,
            "ctx_per_slot": settings.ctx_per_slot,
            "max_tokens": settings.max_tokens,
            "concurrency_levels": list(settings.concurrency_levels),
            "requests_per_level": list(settings.requests_per_level),
            "servers": list(settings.servers),
            "ours_command": settings.ours_command,
            "anchor_ban_eos": settings.anchor_ban_eos,
            "rounds": settings.rounds,
            "yardstick_repack": settings.yardstick_repack,
            "response_format": None if settings.response_format is None else dict(settings.response_format),
            "yardstick_no_repack": result.yardstick_no_repack,
            "ours_repacks": result.ours_repacks,
            "ceiling_commands": result.ceiling_commands,
        },
        "idle_cpu_percent": result.idle,
        # Per server: every level at its median round (the figures the plot shows).
        "reports": {name: report_to_json(median_report(name, rounds)) for name, rounds in result.rounds.items()},
        "rounds": {name: [report_to_json(report) for report in rounds] for name, rounds in result.rounds.items()},
        "ceiling_rounds": [
            [
                {
                    **asdict(run),
                    "output_tokens_per_s": run.output_tokens_per_s,
                    "decode_tokens_per_s": run.decode_tokens_per_s,
                }
                for run in runs
            ]
            for runs in result.ceiling_rounds
        ],
        "ratios": [
            {
                key: _spread_json(value) if isinstance(value, Spread) or value is None else value
                for key, value in vars(row).items()
            }
            for row in ratios
        ],
    }


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="models.yaml name or .gguf path")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=16, help="slots of llama-server and of ours")
    parser.add_argument(
        "--ctx-per-slot", type=int, default=512, help="context of one slot; llama-server gets PARALLEL × this"
    )
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-per-level", type=int, help="default: 4 × concurrency")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="alternating rounds (median, min–max)")
    parser.add_argument("--servers", default=",".join(KNOWN_SERVERS), help="subset and order of servers")
    parser.add_argument(
        "--yardstick-repack",
        choices=REPACK_CHOICES,
        default="auto",
        help="weight repacking of llama-server and llama-batched-bench; auto: as our server's probe decided",
    )
    parser.add_argument("--no-ceiling", action="store_true", help="skip the llama-batched-bench ceiling")
    parser.add_argument(
        "--ceiling-prompt-tokens", type=int, help="prompt length for the ceiling (default: llama-server's count)"
    )
    parser.add_argument(
        "--ours-command",
        default=DEFAULT_OURS_COMMAND,
        help="our server's command line; placeholders: {python} {model} {model_path} {host} {port} {parallel} "
        "{threads} {ctx_per_slot} {ctx_total}",
    )
    parser.add_argument("--ours-health-path", default="/health")
    parser.add_argument(
        "--no-anchor-ban-eos",
        action="store_true",
        help="let llama-cpp-python stop at EOS (it has no ignore_eos; by default EOS gets logit_bias -100)",
    )
    parser.add_argument("--source-dir", type=Path, help="extracted vendor/llama.cpp (default: pip download)")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS_PATH)
    parser.add_argument(
        "--json-schema",
        type=Path,
        help="grammar workload: every answer constrained to this JSON schema (e.g. bench/schemas/answer.json); "
        "implies --no-ceiling",
    )
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument(
        "--log-dir", type=Path, default=Path(tempfile.gettempdir()) / "qwen3-local-bench", help="servers' logs"
    )
    parser.add_argument("--json", type=Path, help="default OUT_DIR/compare.json")
    parser.add_argument("--plot", type=Path, help="default OUT_DIR/compare.png")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> CompareSettings:
    from registry.models import RegistryError, resolve_model

    if min(args.threads, args.parallel, args.ctx_per_slot, args.max_tokens, args.rounds) < 1:
        raise CompareError("--threads, --parallel, --ctx-per-slot, --max-tokens and --rounds must be >= 1")
    if args.ceiling_prompt_tokens is not None and args.ceiling_prompt_tokens < 1:
        raise CompareError("--ceiling-prompt-tokens must be >= 1")
    try:
        model_path = resolve_model(args.model).path
    except RegistryError as exc:
        raise CompareError(str(exc)) from exc
    levels = parse_levels(args.concurrency)
    return CompareSettings(
        model=args.model,
        model_path=model_path,
        threads=args.threads,
        parallel=args.parallel,
        ctx_per_slot=args.ctx_per_slot,
        concurrency_levels=levels,
        requests_per_level=requests_for_levels(levels, args.requests_per_level),
        max_tokens=args.max_tokens,
        servers=parse_servers(args.servers),
        ours_command=args.ours_command,
        ours_health_path=args.ours_health_path,
        anchor_ban_eos=not args.no_anchor_ban_eos,
        rounds=args.rounds,
        yardstick_repack=args.yardstick_repack,
        ceiling=not args.no_ceiling and args.json_schema is None,
        ceiling_prompt_tokens=args.ceiling_prompt_tokens,
        response_format=None if args.json_schema is None else json_schema_format(args.json_schema),
    )


def ceiling_lines(ratios: Sequence[LevelRatio]) -> list[tuple[str, list[tuple[int, float]]]]:
    points = [(row.concurrency, row.ceiling_tok_s.median) for row in ratios if row.ceiling_tok_s is not None]
    return [(f"{CEILING} (ceiling)", points)] if points else []


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        settings = settings_from_args(args)
        if OURS in settings.servers:
            ours_command(settings.ours_command, settings, 0)  # reject a bad template before building anything
        prompts = load_prompts(args.prompts)
        machine = machine_description()
        warn_if_busy(machine)
        exit_on_termination()
        result = run_compare(settings, prompts, args.source_dir, args.log_dir, not args.no_progress)
    except (CompareError, LoadError, LlamaServerError, ServerStartError, httpx.HTTPError) as exc:
        first_line, _, rest = str(exc).partition("\n")
        print(f"error: {first_line}", file=sys.stderr)
        if rest:
            print(rest, file=sys.stderr)
        return 1
    ratios = compute_ratios(result.rounds, settings.concurrency_levels, result.ceiling_rounds)
    medians = [median_report(name, rounds) for name, rounds in result.rounds.items()]
    print(format_reports(medians))
    print()
    print(f"median over {settings.rounds} rounds (min–max); ratios: median of same-round ratios")
    print(format_ratios(ratios))
    json_path = args.json or args.out_dir / "compare.json"
    plot_path = args.plot or args.out_dir / "compare.png"
    write_json(json_path, compare_to_json(settings, result, ratios, machine))
    plot_reports(
        medians,
        plot_path,
        title=f"{settings.model}, {settings.threads} threads, {settings.parallel} slots, "
        f"{settings.max_tokens} tokens/request, median of {settings.rounds} rounds",
        reference_lines=ceiling_lines(ratios),
    )
    print(f"wrote {json_path} and {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
