"""What the operations layer costs: throughput at 16 streams with authentication and the audit log on
(SQLite, then PostgreSQL) against the same server with both off.

    python -m bench.ops_overhead --rounds 5        # SmolLM2, 2 threads, 16 slots, 64 tokens per request

Three servers of ours run side by side with the same model, threads, slots and context: `off` (loopback, no key,
no audit), `sqlite` (a named key with rate limits high enough never to refuse, --audit-db sqlite:///…) and
`postgresql` (the same key, --audit-db on a throwaway PostgreSQL server, bench/postgres.py). Every round drives
each with the same closed-loop streaming load (bench.load), in rotating order; the figure is the median over
rounds of the same-round ratio to `off`. Afterwards each audit database must hold one record per request sent:
an audit log that dropped records under load would make the figure meaningless.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg

from bench.load import DEFAULT_PROMPTS_PATH, LoadPlan, load_prompts, run_load
from bench.postgres import ThrowawayPostgres, free_port
from bench.process import RunningServer, ServerSpec, exit_on_termination, run_server

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
VARIANTS = ("off", "sqlite", "postgresql")
BENCH_KEY_NAME = "bench"
# High enough never to refuse, so the limiter's bookkeeping runs on every request without shaping the load.
KEY_LIMITS = ("--rpm", "1000000", "--tpm", "1000000000")


@dataclass(frozen=True)
class Variant:
    name: str
    spec: ServerSpec
    api_key: str | None
    audit_db: str | None


def make_key(keys_file: Path) -> str:
    """A named inference key in `keys_file`, made with the server's own CLI; the key it prints once."""
    done = subprocess.run(
        [sys.executable, "-m", "server", "keys", "--keys-file", str(keys_file), "add", BENCH_KEY_NAME,
         "--scope", "inference", *KEY_LIMITS],
        capture_output=True, text=True, check=True, cwd=REPO_ROOT,
    )  # fmt: skip
    return done.stdout.strip().splitlines()[0]


def server_command(model: str, port: int, data_dir: Path, args: argparse.Namespace) -> tuple[str, ...]:
    return (
        sys.executable, "-m", "server", "--model", model, "--host", HOST, "--port", str(port),
        "--parallel", str(args.parallel), "--threads", str(args.threads), "--ctx-size", str(args.ctx_per_slot),
        "--data-dir", str(data_dir),
    )  # fmt: skip


def variant(name: str, work: Path, args: argparse.Namespace, postgres_url: str | None) -> Variant:
    data_dir = work / name
    data_dir.mkdir(parents=True)
    port = free_port()
    command = server_command(args.model, port, data_dir, args)
    api_key = None
    audit_db = None
    if name != "off":
        api_key = make_key(data_dir / "keys.json")  # the server's default key file in its data dir
        audit_db = f"sqlite:///{data_dir / 'audit.sqlite3'}" if name == "sqlite" else postgres_url
        assert audit_db is not None
        command += ("--audit-db", audit_db)
    spec = ServerSpec(
        name=f"ours-{name}",
        command=command,
        base_url=f"http://{HOST}:{port}/v1",
        health_url=f"http://{HOST}:{port}/health",
        cwd=REPO_ROOT,
    )
    return Variant(name, spec, api_key, audit_db)


def audit_record_count(audit_db: str) -> int:
    """Records in an audit database (the audit package's `audit_log` table)."""
    if audit_db.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(audit_db.removeprefix("sqlite:///"))) as connection:
            return int(connection.execute("SELECT count(*) FROM audit_log").fetchone()[0])
    with psycopg.connect(audit_db) as connection:
        row = connection.execute("SELECT count(*) FROM audit_log").fetchone()
        return int(row[0]) if row else 0


def round_order(names: Sequence[str], round_index: int) -> list[str]:
    """Rotate who goes first each round, so no variant always runs on a warmer or cooler machine."""
    shift = round_index % len(names)
    return [*names[shift:], *names[:shift]]


async def _one_level(server: RunningServer, api_key: str | None, args: argparse.Namespace, model: str) -> float:
    plan = LoadPlan(
        base_url=server.spec.base_url,
        model=model,
        prompts=load_prompts(args.prompts),
        max_tokens=args.max_tokens,
        concurrency_levels=(args.concurrency,),
        requests_per_level=(args.requests,),
        api_key=api_key,
    )
    report = await run_load(plan, server.spec.name, show_progress=False)
    level = report.levels[0]
    if level.n_errors:
        raise RuntimeError(f"{server.spec.name}: {level.n_errors} requests failed: {level.error_samples[:2]}")
    return float(level.output_tokens_per_s)


@contextlib.contextmanager
def _servers(variants: Sequence[Variant], log_dir: Path) -> Iterator[dict[str, RunningServer]]:
    with contextlib.ExitStack() as stack:
        yield {v.name: stack.enter_context(run_server(v.spec, log_dir)) for v in variants}


def spread(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ops_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--ctx-per-slot", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64, help="requests per server per round")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS_PATH)
    parser.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()) / "qwen3-local-bench")
    args = parser.parse_args(argv)
    exit_on_termination()
    with tempfile.TemporaryDirectory(prefix="qwen3-local-ops-") as work, ThrowawayPostgres() as postgres:
        variants = [variant(name, Path(work), args, postgres.url()) for name in VARIANTS]
        rates: dict[str, list[float]] = {v.name: [] for v in variants}
        with _servers(variants, args.log_dir) as running:
            by_name = {v.name: v for v in variants}
            for round_index in range(args.rounds):
                for name in round_order(VARIANTS, round_index):
                    # the served model id is the models.yaml name
                    rate = asyncio.run(_one_level(running[name], by_name[name].api_key, args, args.model))
                    rates[name].append(rate)
                    print(f"round {round_index + 1} {name:10} {rate:7.1f} tok/s", flush=True)
        counts = {v.name: audit_record_count(v.audit_db) for v in variants if v.audit_db is not None}
    print(
        f"\n{args.concurrency} streams, {args.max_tokens} tokens per request, "
        f"median over {args.rounds} rounds (min–max)"
    )
    for name in VARIANTS:
        ratios = [rate / off for rate, off in zip(rates[name], rates["off"], strict=True)]
        print(f"{name:10} {spread(rates[name]):>24} tok/s   vs off {spread(ratios)}")
    sent = args.rounds * (args.requests + 1)  # each level also sends one warm-up request
    for name, count in counts.items():
        print(f"audit records in {name}: {count} (requests sent: {sent})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
