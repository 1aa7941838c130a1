"""Where a server's time per output token goes: CPU per thread (event loop, engine, llama.cpp workers), the
load client's own CPU, and, with py-spy, what the Python threads spend it on. Next to llama.cpp's
llama-batched-bench, which decodes the same sequences with no server and no client.

    python -m bench.overhead                                   # ours and llama-server, levels 1 and 16
    python -m bench.overhead --servers ours --py-spy "$(command -v py-spy)" --requests-per-level 32

Each server runs alone with the same model, threads, slots and context as in bench.compare; the client is
bench.load's, in this process. Per-thread CPU comes from /proc/PID/task/TID/schedstat (nanoseconds on a
CPU, spinning included). Our server is started through `run-module`, which records which OS thread is
which Python thread (MainThread runs the event loop and HTTP; "engine" runs the step loop and calls
llama.cpp, whose other compute threads are the unnamed ones).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import runpy
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench.compare import (
    DEFAULT_OURS_COMMAND,
    LLAMA_SERVER,
    OURS,
    CeilingRun,
    CompareError,
    CompareSettings,
    batched_bench_command,
    chat_prompt_tokens,
    run_ceiling,
    server_spec,
    wait_for_ours_verdict,
    yardstick_no_repack,
)
from bench.llama_server import LlamaServerError, batched_bench_binary, ensure_llama_server
from bench.load import DEFAULT_PROMPTS_PATH, LoadError, LoadPlan, discover_model, load_prompts, run_load
from bench.process import RunningServer, ServerStartError, exit_on_termination, run_server

# Prefill for the ceiling when no server said how long its prompts were (SmolLM2's chat prompts: ~40 tokens).
DEFAULT_PROMPT_TOKENS = 40
MAIN_THREAD = "MainThread"
ENGINE_THREAD = "engine"
# Thread groups of our server; threads the map does not name are llama.cpp's (OpenMP) compute threads.
GROUP_LOOP = "event loop (HTTP, SSE, dispatch)"
GROUP_ENGINE = "engine thread (step loop + its share of llama.cpp)"
GROUP_WORKERS = "llama.cpp worker threads"
GROUP_OTHER = "other Python threads"

# py-spy stack buckets, most specific first: a stack belongs to the first bucket one of its frames matches,
# looking from the innermost frame outwards. py-spy names a frame `Class.method (path/file.py:line)`.
BUCKETS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("llama.cpp decode", re.compile(r"LlamaBackend\.(decode|apply|_fill_batch) ")),
    ("sampling", re.compile(r"LlamaBackend\.(sample|_greedy_token|_logits_view|_logprob|\w*sampler\w*) ")),
    ("detokenize", re.compile(r"TextStream\.|LlamaBackend\.(piece|token_text|is_eog) ")),
    ("scheduler", re.compile(r"engine/scheduler\.py|engine/sequence\.py")),
    ("json", re.compile(r"json/(encoder|decoder|__init__)\.py")),
    ("metrics", re.compile(r"prometheus_client/")),
    ("SSE chunks", re.compile(r"api/sse\.py|api/responses\.py|api/openai\.py|api/errors\.py")),
    ("generation/dispatch", re.compile(r"api/generation\.py|engine/engine\.py")),
    ("uvicorn+h11", re.compile(r"uvicorn/|h11/|httptools")),
    ("starlette+sse_starlette+anyio", re.compile(r"starlette/|sse_starlette/|anyio/|fastapi/")),
    ("socket writes", re.compile(r"_SelectorSocketTransport\.write |\._write_to_self |\.send \(socket")),
    ("epoll wake-ups", re.compile(r"Selector\.select |_read_from_self ")),
    ("asyncio (tasks, queues, callbacks)", re.compile(r"asyncio/")),
)
_PY_SPY_THREAD = re.compile(r"^thread \((\d+)\): (.*)$")
OTHER_BUCKET = "other"


# --- per-thread CPU ------------------------------------------------------------------------------------------
def read_thread_cpu_ns(pid: int) -> dict[int, int]:
    """Nanoseconds each thread of a process has run (schedstat: on-CPU time, spinning included)."""
    times = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            times[int(task.name)] = int((task / "schedstat").read_text().split()[0])
    return times


def thread_comms(pid: int) -> dict[int, str]:
    names = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError):
            names[int(task.name)] = (task / "comm").read_text().strip()
    return names


def cpu_delta_ns(before: Mapping[int, int], after: Mapping[int, int]) -> dict[int, int]:
    """CPU each thread used between two readings (a thread born in between counts from zero)."""
    return {tid: ns - before.get(tid, 0) for tid, ns in after.items() if ns - before.get(tid, 0) > 0}


def read_thread_map(path: Path) -> dict[int, str]:
    """The `TID NAME` lines run-module wrote: which OS thread is which Python thread."""
    names = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            tid, _, name = line.partition(" ")
            with contextlib.suppress(ValueError):
                names[int(tid)] = name
    return names


def group_of(name: str | None) -> str:
    if name is None:
        return GROUP_WORKERS
    if name == MAIN_THREAD:
        return GROUP_LOOP
    if name == ENGINE_THREAD:
        return GROUP_ENGINE
    return GROUP_OTHER


def group_thread_cpu(delta_ns: Mapping[int, int], thread_map: Mapping[int, str]) -> dict[str, int]:
    groups: Counter[str] = Counter()
    for tid, ns in delta_ns.items():
        groups[group_of(thread_map.get(tid))] += ns
    return dict(groups)


def run_module_with_thread_map(map_path: Path, module: str, args: Sequence[str]) -> None:
    """Run `python -m module args` in this process, writing `TID NAME` for every thread as it starts."""
    lock = threading.Lock()

    def record(native_id: int | None, name: str) -> None:
        with lock, map_path.open("a") as sink:
            sink.write(f"{native_id} {name}\n")

    record(threading.get_native_id(), MAIN_THREAD)
    original = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]

    def bootstrap_inner(self: threading.Thread) -> None:
        record(threading.get_native_id(), self.name)
        original(self)

    threading.Thread._bootstrap_inner = bootstrap_inner  # type: ignore[attr-defined]
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


# --- py-spy stacks ---------------------------------------------------------------------------------------
def bucket_of(frames: Sequence[str]) -> str:
    """The bucket of one stack (outermost frame first, as py-spy's raw format lists them)."""
    for frame in reversed(frames):
        for bucket, pattern in BUCKETS:
            if pattern.search(frame):
                return bucket
    return OTHER_BUCKET


def summarize_stacks(raw: str) -> dict[str, dict[str, int]]:
    """py-spy `record --threads --format raw` (`thread (TID): NAME;frame;frame;... COUNT` lines) → samples per
    bucket for the engine thread ("engine") and the event loop's thread ("loop"); other threads are left out."""
    summary: dict[str, Counter[str]] = {"engine": Counter(), "loop": Counter()}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        head, *frames = stack.split(";")
        thread = _PY_SPY_THREAD.match(head)
        name = thread.group(2) if thread else None
        kind = "engine" if name == ENGINE_THREAD else "loop" if name == MAIN_THREAD else None
        if kind is not None:
            summary[kind][bucket_of(frames)] += int(count)
    return {kind: dict(counts) for kind, counts in summary.items()}


@contextlib.contextmanager
def py_spy_recording(py_spy: Path | None, pid: int, output: Path, rate: int) -> Iterator[None]:
    """Sample the process with py-spy while the block runs (no-op without py-spy)."""
    if py_spy is None:
        yield
        return
    command = [str(py_spy), "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw"]
    command += ["--output", str(output), "--nonblocking", "--threads"]
    recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)  # attached before the load starts
    try:
        yield
    finally:
        recorder.send_signal(signal.SIGINT)
        try:
            recorder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            recorder.kill()
            recorder.wait()


# --- one measured level ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LevelCost:
    server: str
    concurrency: int
    output_tokens: int
    wall_s: float
    thread_cpu_ns: dict[str, int]  # per thread group (ours) or per thread name (others)
    client_cpu_ns: int
    # py-spy samples per bucket, per thread kind (empty without py-spy)
    stacks: dict[str, dict[str, int]]
    # Prompt tokens the server computed per request (its usage: prompt minus cached); None if not reported.
    computed_prompt_tokens: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def us_per_token(self, ns: float) -> float:
        return ns / 1000.0 / self.output_tokens if self.output_tokens else 0.0

    def bucket_us_per_token(self) -> dict[str, dict[str, float]]:
        """py-spy's split of each Python thread's CPU, in µs per output token."""
        own_cpu = {"loop": self.thread_cpu_ns.get(GROUP_LOOP, 0), "engine": self.thread_cpu_ns.get(GROUP_ENGINE, 0)}
        result = {}
        for kind, counts in self.stacks.items():
            total = sum(counts.values())
            if total:
                scale = self.us_per_token(own_cpu[kind]) / total
                result[kind] = {
                    bucket: count * scale for bucket, count in sorted(counts.items(), key=lambda kv: -kv[1])
                }
        return result


async def measure_level(
    running: RunningServer,
    label: str,
    plan: LoadPlan,
    thread_map_path: Path | None,
    py_spy: Path | None,
    spy_output: Path,
    spy_rate: int,
) -> LevelCost:
    pid = running.process.pid
    await run_load(replace(plan, requests_per_level=(plan.concurrency_levels[0],)), label, show_progress=False)
    with py_spy_recording(py_spy, pid, spy_output, spy_rate):
        # The level's own CPU readings, so the client's set-up (its TLS context, the warm-up) stays out.
        readings: list[dict[int, int]] = []
        report = await run_load(
            replace(plan, warmup_requests=0),
            label,
            show_progress=False,
            on_level_edge=lambda: readings.append(read_thread_cpu_ns(pid)),
        )
    before, after = readings
    level = report.levels[0]
    delta = cpu_delta_ns(before, after)
    if thread_map_path is not None:
        per_group = group_thread_cpu(delta, read_thread_map(thread_map_path))
    else:
        comms = thread_comms(pid)
        per_group = dict(Counter({f"{comms.get(tid, '?')}[{tid}]": ns for tid, ns in delta.items()}).most_common(6))
    stacks = summarize_stacks(spy_output.read_text()) if py_spy is not None and spy_output.is_file() else {}
    return LevelCost(
        server=label,
        concurrency=level.concurrency,
        output_tokens=level.output_tokens,
        wall_s=level.wall_s,
        thread_cpu_ns=per_group,
        client_cpu_ns=int((level.client_cpu_s or 0.0) * 1e9),
        stacks=stacks,
        computed_prompt_tokens=level.mean_computed_prompt_tokens,
    )


def format_costs(costs: Sequence[LevelCost], ceiling_runs: Sequence[CeilingRun]) -> str:
    lines = []
    ceiling = {run.sequences: run.output_tokens_per_s for run in ceiling_runs}
    for cost in costs:
        wall_us = 1e6 / cost.tokens_per_s if cost.tokens_per_s else 0.0
        ceiling_rate = ceiling.get(cost.concurrency)
        versus = f", {cost.tokens_per_s / ceiling_rate:.2f} of the ceiling" if ceiling_rate else ""
        lines.append(
            f"{cost.server} c={cost.concurrency}: {cost.tokens_per_s:.1f} tok/s ({wall_us:.0f} µs wall per token"
            f"{versus}); client {cost.us_per_token(cost.client_cpu_ns):.0f} µs CPU/token"
        )
        for group, ns in sorted(cost.thread_cpu_ns.items(), key=lambda kv: -kv[1]):
            lines.append(f"    {group:<52} {cost.us_per_token(ns):>7.0f} µs CPU/token")
        for kind, buckets in cost.bucket_us_per_token().items():
            split = ", ".join(f"{bucket} {us:.0f}" for bucket, us in buckets.items() if us >= 1)
            lines.append(f"    py-spy {kind}: {split} (µs/token)")
    for run in ceiling_runs:
        lines.append(
            f"llama-batched-bench c={run.sequences}, {run.prompt_tokens} prompt + {run.output_tokens} output tokens: "
            f"{run.output_tokens_per_s:.1f} tok/s ({1e6 / run.output_tokens_per_s:.0f} µs wall per token; "
            f"decode alone {run.decode_tokens_per_s:.1f} tok/s, {1e6 / run.decode_tokens_per_s:.0f} µs)"
        )
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--ctx-per-slot", type=int, default=512)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-per-level", type=int, help="default: 4 × concurrency")
    parser.add_argument("--servers", default=f"{OURS},{LLAMA_SERVER}")
    parser.add_argument("--ours-command", default=DEFAULT_OURS_COMMAND)
    parser.add_argument("--py-spy", type=Path, help="py-spy binary: also sample where our Python threads spend it")
    parser.add_argument("--py-spy-rate", type=int, default=200)
    parser.add_argument("--no-ceiling", action="store_true")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS_PATH)
    parser.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()) / "qwen3-local-bench")
    parser.add_argument("--json", type=Path, help="write the measurements here")
    return parser.parse_args(argv)


def _settings(args: argparse.Namespace) -> CompareSettings:
    from bench.load import parse_levels, requests_for_levels
    from registry.models import resolve_model

    levels = parse_levels(args.concurrency)
    return CompareSettings(
        model=args.model,
        model_path=resolve_model(args.model).path,
        threads=args.threads,
        parallel=args.parallel,
        ctx_per_slot=args.ctx_per_slot,
        concurrency_levels=levels,
        requests_per_level=requests_for_levels(levels, args.requests_per_level),
        max_tokens=args.max_tokens,
        servers=tuple(name.strip() for name in args.servers.split(",") if name.strip()),
        ours_command=args.ours_command,
        ours_health_path="/health",
        anchor_ban_eos=False,
        rounds=1,
    )


def _wrapped_ours_command(command: Sequence[str], map_path: Path) -> tuple[str, ...]:
    """`python -m server ARGS` → `python -m bench.overhead run-module MAP server ARGS`."""
    if len(command) < 3 or command[1] != "-m":
        raise CompareError(f"--ours-command must be `PYTHON -m MODULE ...` to be measured per thread: {command}")
    return (command[0], "-m", "bench.overhead", "run-module", str(map_path), *command[2:])


async def _measure_server(
    running: RunningServer, name: str, settings: CompareSettings, prompts: tuple[str, ...], args: argparse.Namespace,
    map_path: Path | None, work_dir: Path,
) -> list[LevelCost]:  # fmt: skip
    model = await discover_model(running.spec.base_url)
    costs = []
    for concurrency, n_requests in zip(settings.concurrency_levels, settings.requests_per_level, strict=True):
        plan = LoadPlan(
            base_url=running.spec.base_url,
            model=model,
            prompts=prompts,
            max_tokens=settings.max_tokens,
            concurrency_levels=(concurrency,),
            requests_per_level=(n_requests,),
        )
        spy = args.py_spy if name == OURS else None
        output = work_dir / f"py-spy-{name}-{concurrency}.txt"
        cost = await measure_level(running, name, plan, map_path, spy, output, args.py_spy_rate)
        print(format_costs([cost], []), flush=True)  # as it comes: a slow machine may not see the end
        costs.append(cost)
    return costs


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "run-module":
        run_module_with_thread_map(Path(argv[1]), argv[2], argv[3:])
        return 0
    args = _parse_args(argv)
    exit_on_termination()
    try:
        settings = _settings(args)
        prompts = load_prompts(args.prompts)
        binary = ensure_llama_server()
        costs: list[LevelCost] = []
        no_repack = yardstick_no_repack("auto", None)
        prompt_tokens: int | None = None
        work_dir = args.log_dir / f"overhead-{os.getpid()}"  # thread map and py-spy stacks stay for a look
        work_dir.mkdir(parents=True, exist_ok=True)
        for name in settings.servers:
            map_path = work_dir / "threads.txt" if name == OURS else None
            spec = server_spec(name, settings, binary, no_repack=no_repack)
            if map_path is not None:
                spec = replace(spec, command=_wrapped_ours_command(spec.command, map_path))
            print(f"starting {name}: {shlex.join(spec.command)}", flush=True)
            with run_server(spec, log_dir=args.log_dir) as running:
                if name == OURS:
                    no_repack = yardstick_no_repack("auto", wait_for_ours_verdict(running.log_path))
                if name == LLAMA_SERVER:
                    prompt_tokens = asyncio.run(chat_prompt_tokens(running.spec.base_url, prompts))
                costs += asyncio.run(_measure_server(running, name, settings, prompts, args, map_path, work_dir))
        ceiling: list[CeilingRun] = []
        for level in settings.concurrency_levels if not args.no_ceiling else ():
            measured = {cost.server: cost.computed_prompt_tokens for cost in costs if cost.concurrency == level}
            computed = next((measured[n] for n in (OURS, LLAMA_SERVER) if measured.get(n) is not None), None)
            prompt = max(1, round(computed)) if computed is not None else prompt_tokens or DEFAULT_PROMPT_TOKENS
            command = batched_bench_command(batched_bench_binary(binary), settings, level, prompt, no_repack)
            print(f"ceiling: {shlex.join(command)}", flush=True)
            ceiling += run_ceiling(command, (level,))
    except (CompareError, LoadError, LlamaServerError, ServerStartError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"\nall levels (py-spy stacks in {work_dir}):")
    print(format_costs(costs, ceiling))
    if args.json is not None:
        body: dict[str, Any] = {
            "costs": [{**vars(cost), "tokens_per_s": cost.tokens_per_s} for cost in costs],
            "ceiling": [{**asdict(run), "output_tokens_per_s": run.output_tokens_per_s} for run in ceiling],
        }
        args.json.write_text(json.dumps(body, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
