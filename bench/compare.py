"""Side-by-side load benchmark: our server against llama.cpp's C++ llama-server, with llama-cpp-python's
own server as the lower anchor. Same model, threads, slots and context; same requests.

    python -m bench.compare                          # SmolLM2, 2 threads, 16 slots, levels 1,4,16
    python -m bench.compare --servers llama-server,llama-cpp-python --concurrency 1,4 --max-tokens 16

All servers are started first (each on a free loopback port), then every concurrency level runs against
each server in turn, the order reversed at every level, so a change in machine load hits all of them
alike. llama-server is built once from the pinned llama-cpp-python sdist (see bench.llama_server).
The "ours" command line is a template (--ours-command) so it follows the server's CLI as it evolves.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil

from bench.llama_server import (
    LlamaServerError,
    LlamaServerSettings,
    ensure_llama_server,
    llama_server_spec,
    this_cpu_has_amx,
)
from bench.load import (
    DEFAULT_PROMPTS_PATH,
    LoadError,
    LoadPlan,
    discover_model,
    format_reports,
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
KNOWN_SERVERS = (LLAMA_SERVER, OURS, LLAMA_CPP_PYTHON)
DEFAULT_OURS_COMMAND = (
    "{python} -m server --model {model} --host {host} --port {port} --parallel {parallel} "
    "--threads {threads} --ctx-size {ctx_per_slot}"
)
HOST = "127.0.0.1"
IDLE_CPU_SAMPLE_S = 1.0
# An idle server burning more than this much CPU would slow down whichever server is being measured.
IDLE_CPU_WARN_PERCENT = 5.0
# A 1-minute load average above this fraction of the CPU count means someone else is computing.
BUSY_LOAD_FRACTION = 0.5


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


@dataclass(frozen=True)
class LevelRatio:
    """How our server compares at one concurrency level (None where a side is missing or zero)."""

    concurrency: int
    ours_tok_s: float | None
    llama_server_tok_s: float | None
    llama_cpp_python_tok_s: float | None
    ours_vs_llama_server: float | None
    ours_vs_llama_cpp_python: float | None
    ours_ttft_p50_ms: float | None
    llama_server_ttft_p50_ms: float | None


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


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def _level(report: LoadReport | None, concurrency: int) -> LevelSummary | None:
    if report is None:
        return None
    return next((level for level in report.levels if level.concurrency == concurrency), None)


def compute_ratios(reports: dict[str, LoadReport], levels: Sequence[int]) -> tuple[LevelRatio, ...]:
    ratios = []
    for concurrency in levels:
        ours = _level(reports.get(OURS), concurrency)
        reference = _level(reports.get(LLAMA_SERVER), concurrency)
        anchor = _level(reports.get(LLAMA_CPP_PYTHON), concurrency)
        ours_tok_s = ours.output_tokens_per_s if ours else None
        reference_tok_s = reference.output_tokens_per_s if reference else None
        anchor_tok_s = anchor.output_tokens_per_s if anchor else None
        ratios.append(
            LevelRatio(
                concurrency=concurrency,
                ours_tok_s=ours_tok_s,
                llama_server_tok_s=reference_tok_s,
                llama_cpp_python_tok_s=anchor_tok_s,
                ours_vs_llama_server=ratio(ours_tok_s, reference_tok_s),
                ours_vs_llama_cpp_python=ratio(ours_tok_s, anchor_tok_s),
                ours_ttft_p50_ms=ours.ttft_p50_ms if ours else None,
                llama_server_ttft_p50_ms=reference.ttft_p50_ms if reference else None,
            )
        )
    return tuple(ratios)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_ratios(ratios: Sequence[LevelRatio]) -> str:
    lines = [
        f"{'conc':>4} {'ours tok/s':>10} {'llama-server':>12} {'llama-cpp-py':>12} "
        f"{'ours/l-s':>8} {'ours/l-c-p':>10} {'TTFT p50 ours':>13} {'l-s':>8}"
    ]
    for row in ratios:
        lines.append(
            f"{row.concurrency:>4} {_fmt(row.ours_tok_s, '.1f'):>10} {_fmt(row.llama_server_tok_s, '.1f'):>12} "
            f"{_fmt(row.llama_cpp_python_tok_s, '.1f'):>12} {_fmt(row.ours_vs_llama_server, '.2f'):>8} "
            f"{_fmt(row.ours_vs_llama_cpp_python, '.2f'):>10} {_fmt(row.ours_ttft_p50_ms, '.0f'):>11}ms "
            f"{_fmt(row.llama_server_ttft_p50_ms, '.0f'):>6}ms"
        )
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


def server_spec(name: str, settings: CompareSettings, llama_server_binary: Path | None) -> ServerSpec:
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
            # The yardstick always runs --no-repack: safe where AMX is broken, and the same CPU buffer types on
            # every machine (SmolLM2's Q4_1 weights have no repacked kernels, so its speed is unaffected).
            no_repack=True,
        )
    )


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


async def _run_alternating(
    running: dict[str, RunningServer], settings: CompareSettings, prompts: tuple[str, ...], show_progress: bool
) -> dict[str, LoadReport]:
    models = {name: await discover_model(server.spec.base_url) for name, server in running.items()}
    banned = eos_token_id(settings.model_path) if settings.anchor_ban_eos else None
    parts: dict[str, list[LoadReport]] = {name: [] for name in running}
    for level_index, (concurrency, n_requests) in enumerate(
        zip(settings.concurrency_levels, settings.requests_per_level, strict=True)
    ):
        for name in level_order(tuple(running), level_index):
            plan = LoadPlan(
                base_url=running[name].spec.base_url,
                model=models[name],
                prompts=prompts,
                max_tokens=settings.max_tokens,
                concurrency_levels=(concurrency,),
                requests_per_level=(n_requests,),
                banned_token_ids=(banned,) if name == LLAMA_CPP_PYTHON and banned is not None else (),
            )
            parts[name].append(await run_load(plan, name, show_progress=show_progress))
    return {name: merge_level_reports(name, reports) for name, reports in parts.items()}


def run_compare(
    settings: CompareSettings, prompts: tuple[str, ...], source_dir: Path | None, log_dir: Path, show_progress: bool
) -> tuple[dict[str, LoadReport], dict[str, float]]:
    """Start every server, run the alternating benchmark, stop them; returns reports and idle CPU use."""
    binary = ensure_llama_server(source_dir) if LLAMA_SERVER in settings.servers else None
    with contextlib.ExitStack() as stack:
        running: dict[str, RunningServer] = {}
        for name in settings.servers:
            spec = server_spec(name, settings, binary)
            print(f"starting {name} (log in {log_dir}): {shlex.join(spec.command)}", flush=True)
            running[name] = stack.enter_context(run_server(spec, log_dir=log_dir))
        idle = {name: idle_cpu_percent(server.process.pid) for name, server in running.items()}
        for name, percent in idle.items():
            if percent > IDLE_CPU_WARN_PERCENT:
                print(f"warning: idle {name} uses {percent:.0f}% CPU, which slows the others down", flush=True)
        reports = asyncio.run(_run_alternating(running, settings, prompts, show_progress))
    return reports, idle


def compare_to_json(
    settings: CompareSettings,
    reports: dict[str, LoadReport],
    ratios: Sequence[LevelRatio],
    idle: dict[str, float],
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
        },
        "idle_cpu_percent": idle,
        "reports": {name: report_to_json(report) for name, report in reports.items()},
        "ratios": [vars(row) for row in ratios],
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
    parser.add_argument("--servers", default=",".join(KNOWN_SERVERS), help="subset and order of servers")
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
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument(
        "--log-dir", type=Path, default=Path(tempfile.gettempdir()) / "qwen3-local-bench", help="servers' logs"
    )
    parser.add_argument("--json", type=Path, help="default OUT_DIR/compare.json")
    parser.add_argument("--plot", type=Path, help="default OUT_DIR/compare.png")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> CompareSettings:
    from convert.registry import RegistryError, resolve_model

    if min(args.threads, args.parallel, args.ctx_per_slot, args.max_tokens) < 1:
        raise CompareError("--threads, --parallel, --ctx-per-slot and --max-tokens must be >= 1")
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
    )


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
        reports, idle = run_compare(settings, prompts, args.source_dir, args.log_dir, not args.no_progress)
    except (CompareError, LoadError, LlamaServerError, ServerStartError) as exc:
        first_line, _, rest = str(exc).partition("\n")
        print(f"error: {first_line}", file=sys.stderr)
        if rest:
            print(rest, file=sys.stderr)
        return 1
    ratios = compute_ratios(reports, settings.concurrency_levels)
    print(format_reports(list(reports.values())))
    print()
    print(format_ratios(ratios))
    json_path = args.json or args.out_dir / "compare.json"
    plot_path = args.plot or args.out_dir / "compare.png"
    write_json(json_path, compare_to_json(settings, reports, ratios, idle, machine))
    plot_reports(
        list(reports.values()),
        plot_path,
        title=f"{settings.model}, {settings.threads} threads, {settings.parallel} slots, "
        f"{settings.max_tokens} tokens/request",
    )
    print(f"wrote {json_path} and {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
