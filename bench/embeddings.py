"""Embeddings throughput, ours vs llama.cpp's llama-server `--embeddings`: inputs/s for 64 short texts.

    python -m bench.embeddings                      # SmolLM2, 2 threads, mean pooling, batch 512, 5 rounds
    python -m bench.embeddings --rounds 2 --texts 64 --repeats 1

Both servers are started by this script (each on a free loopback port) with the same model, threads, pooling
and batch size (llama-server: -b = -ub = --batch, one unified KV cache, --parallel = --texts so every input
of a request can be in one decode; ours: --max-batch-tokens = --batch). The yardstick is the llama-server
bench.compare uses, built once from the pinned llama-cpp-python sdist, with the same weight layout as ours
(repacked or not, as our server's probe decided).

Two workloads, each timed `--repeats` times per server per round: "batch" is one request holding all texts,
"concurrent" is one request per text, all at once. Rounds alternate which server goes first. Each figure is
the median over the rounds with its min–max spread; the ratio is the median of same-round ratios. Before
the rounds, each server's vectors are checked: the same text embedded alone and among the others should
give the same vector (max |difference| printed), and ours against llama-server's (cosine printed).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.compare import (
    HOST,
    REPO_ROOT,
    CompareError,
    Spread,
    free_port,
    level_order,
    machine_description,
    ratio,
    wait_for_ours_verdict,
    warn_if_busy,
    yardstick_no_repack,
)
from bench.llama_server import LlamaServerError, LlamaServerSettings, ensure_llama_server, llama_server_spec
from bench.process import RunningServer, ServerSpec, ServerStartError, exit_on_termination, run_server

OURS = "ours"
LLAMA_SERVER = "llama-server"
SERVERS = (OURS, LLAMA_SERVER)
WORKLOADS = ("batch", "concurrent")
POOLINGS = ("mean", "cls", "last")
DEFAULT_TEXTS = 64
DEFAULT_ROUNDS = 5
REQUEST_TIMEOUT_S = 600.0
# Subjects and predicates combined into short, distinct sentences (8-14 tokens each for SmolLM2).
_SUBJECTS = (
    "The cat", "A retired sailor", "My neighbour's dog", "The city council", "A small startup", "The old library",
    "Our physics teacher", "A hungry fox",
)  # fmt: skip
_PREDICATES = (
    "sat quietly on the warm mat.", "filed the quarterly taxes late.", "planted tomatoes in the spring.",
    "argued about the new bridge.", "shipped a bug fix on Friday.", "closed early because of snow.",
    "explained how rainbows form.", "chased a rabbit across the field.",
)  # fmt: skip


@dataclass(frozen=True)
class BenchSettings:
    model: str
    model_path: Path
    threads: int
    pooling: str
    batch: int  # tokens of one decode: --max-batch-tokens for ours, -b/-ub for llama-server
    n_texts: int
    rounds: int
    repeats: int
    encoding_format: str


def bench_texts(n_texts: int) -> list[str]:
    """n distinct short sentences, the same on every run."""
    combos = [f"{subject} {predicate}" for predicate in _PREDICATES for subject in _SUBJECTS]
    return [combos[index % len(combos)] + ("" if index < len(combos) else f" ({index})") for index in range(n_texts)]


def ours_command(settings: BenchSettings, port: int) -> tuple[str, ...]:
    return (
        sys.executable, "-m", "server",
        "--model", settings.model,
        "--host", HOST,
        "--port", str(port),
        "--embeddings",
        "--pooling", settings.pooling,
        "--threads", str(settings.threads),
        "--threads-batch", str(settings.threads),
        "--max-batch-tokens", str(settings.batch),
        "--n-ubatch", str(settings.batch),
        "--parallel", "4",
        "--ctx-size", "512",
    )  # fmt: skip


def llama_server_settings(settings: BenchSettings, binary: Path, port: int, no_repack: bool) -> LlamaServerSettings:
    """One slot per text (each input of a request is a task that takes a slot), one unified KV cache big enough
    for all of them at once, and the batch as ours: every text of a request can go in one decode, as in ours."""
    return LlamaServerSettings(
        binary=binary,
        model_path=settings.model_path,
        port=port,
        threads=settings.threads,
        parallel=settings.n_texts,
        ctx_size=max(4096, settings.batch),
        host=HOST,
        no_repack=no_repack,
        extra_args=(
            "--embeddings",
            "--pooling", settings.pooling,
            "--batch-size", str(settings.batch),
            "--ubatch-size", str(settings.batch),
            "--kv-unified",
        ),
    )  # fmt: skip


def ours_spec(settings: BenchSettings) -> ServerSpec:
    port = free_port()
    return ServerSpec(
        name=OURS,
        command=ours_command(settings, port),
        base_url=f"http://{HOST}:{port}/v1",
        health_url=f"http://{HOST}:{port}/health",
        cwd=REPO_ROOT,
    )


def decode_vectors(body: Mapping[str, Any], n_expected: int) -> list[np.ndarray]:
    """The vectors of an embeddings response in input order, float or base64; a wrong answer raises."""
    data = sorted(body.get("data") or [], key=lambda item: int(item["index"]))
    if len(data) != n_expected:
        raise CompareError(f"expected {n_expected} embeddings, got {len(data)}: {str(body)[:300]}")
    vectors = []
    for item in data:
        embedding = item["embedding"]
        if isinstance(embedding, str):
            vectors.append(np.frombuffer(base64.b64decode(embedding), dtype="<f4").astype(np.float64))
        else:
            vectors.append(np.asarray(embedding, dtype=np.float64))
    if len({vector.shape for vector in vectors}) != 1:
        raise CompareError("embeddings of different lengths in one response")
    return vectors


async def embed(
    client: httpx.AsyncClient, base_url: str, inputs: str | list[str], encoding_format: str
) -> list[np.ndarray]:
    response = await client.post(f"{base_url}/embeddings", json={"input": inputs, "encoding_format": encoding_format})
    if response.status_code != 200:
        raise CompareError(f"{base_url}/embeddings answered {response.status_code}: {response.text[:300]}")
    return decode_vectors(response.json(), 1 if isinstance(inputs, str) else len(inputs))


async def timed_workload(
    client: httpx.AsyncClient, base_url: str, workload: str, texts: list[str], repeats: int, encoding_format: str
) -> float:
    """Inputs per second over `repeats` runs of the workload."""
    started = time.perf_counter()
    for _ in range(repeats):
        if workload == "batch":
            await embed(client, base_url, texts, encoding_format)
        else:
            await asyncio.gather(*(embed(client, base_url, text, encoding_format) for text in texts))
    return inputs_per_s(len(texts) * repeats, time.perf_counter() - started)


def inputs_per_s(n_inputs: int, seconds: float) -> float:
    return n_inputs / seconds if seconds > 0 else 0.0


def max_batch_difference(batched: Sequence[np.ndarray], alone: Sequence[np.ndarray]) -> float:
    """How far an input's vector moves when other inputs share its request (0 when it does not)."""
    return max(float(np.abs(a - b).max()) for a, b in zip(batched, alone, strict=True))


def mean_cosine(first: Sequence[np.ndarray], second: Sequence[np.ndarray]) -> float:
    cosines = [float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in zip(first, second, strict=True)]
    return sum(cosines) / len(cosines)


def summarize(samples: Mapping[str, Mapping[str, Sequence[float]]]) -> dict[str, dict[str, Spread | None]]:
    """Per workload: each server's inputs/s over the rounds, and ours/llama-server of the same round."""
    summary: dict[str, dict[str, Spread | None]] = {}
    for workload, per_server in samples.items():
        ours, theirs = per_server.get(OURS, ()), per_server.get(LLAMA_SERVER, ())
        ratios = [ratio(a, b) for a, b in zip(ours, theirs, strict=False)]
        summary[workload] = {
            OURS: Spread.of(list(ours)),
            LLAMA_SERVER: Spread.of(list(theirs)),
            "ratio": Spread.of(ratios),
        }
    return summary


def _spread_text(value: Spread | None, spec: str) -> str:
    if value is None:
        return "-"
    return f"{value.median:{spec}} ({value.low:{spec}}–{value.high:{spec}})"


def format_summary(summary: Mapping[str, Mapping[str, Spread | None]], n_texts: int) -> str:
    lines = [f"{'workload':<12} {'ours inputs/s':>24} {'llama-server inputs/s':>24} {'ours / llama-server':>22}"]
    for workload, row in summary.items():
        label = f"{workload}×{n_texts}"
        lines.append(
            f"{label:<12} {_spread_text(row[OURS], '.1f'):>24} {_spread_text(row[LLAMA_SERVER], '.1f'):>24} "
            f"{_spread_text(row['ratio'], '.2f'):>22}"
        )
    return "\n".join(lines)


async def check_vectors(running: Mapping[str, RunningServer], texts: list[str], fmt: str) -> dict[str, float]:
    """Batched-vs-alone difference per server on the first 8 texts, and ours vs llama-server's cosine."""
    sample = texts[:8]
    found: dict[str, float] = {}
    batched: dict[str, list[np.ndarray]] = {}
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, trust_env=False) as client:
        for name, server in running.items():
            batched[name] = await embed(client, server.spec.base_url, sample, fmt)
            alone = [(await embed(client, server.spec.base_url, text, fmt))[0] for text in sample]
            found[f"{name} max |batched - alone|"] = max_batch_difference(batched[name], alone)
    if OURS in batched and LLAMA_SERVER in batched:
        found["mean cosine ours vs llama-server"] = mean_cosine(batched[OURS], batched[LLAMA_SERVER])
    return found


async def run_rounds(
    running: Mapping[str, RunningServer], settings: BenchSettings, texts: list[str]
) -> dict[str, dict[str, list[float]]]:
    samples: dict[str, dict[str, list[float]]] = {workload: {name: [] for name in running} for workload in WORKLOADS}
    async with httpx.AsyncClient(
        timeout=REQUEST_TIMEOUT_S, trust_env=False, limits=httpx.Limits(max_connections=len(texts))
    ) as client:
        for server in running.values():  # warm-up: first decodes allocate and fault in the weights
            await timed_workload(client, server.spec.base_url, "batch", texts, 1, settings.encoding_format)
        for round_index in range(settings.rounds):
            for workload in WORKLOADS:
                for name in level_order(list(running), round_index):
                    rate = await timed_workload(
                        client, running[name].spec.base_url, workload, texts, settings.repeats, settings.encoding_format
                    )
                    samples[workload][name].append(rate)
                    print(f"round {round_index + 1} {workload:<10} {name:<12} {rate:8.1f} inputs/s", flush=True)
    return samples


def run_bench(settings: BenchSettings, log_dir: Path) -> tuple[dict[str, dict[str, list[float]]], dict[str, float]]:
    binary = ensure_llama_server()
    texts = bench_texts(settings.n_texts)
    with contextlib.ExitStack() as stack:
        spec = ours_spec(settings)
        print(f"starting {OURS} (log in {log_dir}): {shlex.join(spec.command)}", flush=True)
        running = {OURS: stack.enter_context(run_server(spec, log_dir=log_dir))}
        no_repack = yardstick_no_repack("auto", wait_for_ours_verdict(running[OURS].log_path))
        yardstick = llama_server_spec(llama_server_settings(settings, binary, free_port(), no_repack))
        print(f"starting {LLAMA_SERVER}: {shlex.join(yardstick.command)}", flush=True)
        running[LLAMA_SERVER] = stack.enter_context(run_server(yardstick, log_dir=log_dir))
        checks = asyncio.run(check_vectors(running, texts, settings.encoding_format))
        samples = asyncio.run(run_rounds(running, settings, texts))
    return samples, checks


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.embeddings", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="models.yaml name or .gguf path")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pooling", choices=POOLINGS, default="mean")
    parser.add_argument("--batch", type=int, default=512, help="tokens per decode, both servers")
    parser.add_argument("--texts", type=int, default=DEFAULT_TEXTS, help="short texts per workload")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="alternating rounds (median, min–max)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each workload per round")
    parser.add_argument("--encoding-format", choices=("float", "base64"), default="base64")
    parser.add_argument(
        "--log-dir", type=Path, default=Path(tempfile.gettempdir()) / "qwen3-local-bench", help="servers' logs"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    from registry.models import RegistryError, resolve_model

    if min(args.threads, args.batch, args.texts, args.rounds, args.repeats) < 1:
        raise CompareError("--threads, --batch, --texts, --rounds and --repeats must be >= 1")
    try:
        model_path = resolve_model(args.model).path
    except RegistryError as exc:
        raise CompareError(str(exc)) from exc
    return BenchSettings(
        model=args.model,
        model_path=model_path,
        threads=args.threads,
        pooling=args.pooling,
        batch=args.batch,
        n_texts=args.texts,
        rounds=args.rounds,
        repeats=args.repeats,
        encoding_format=args.encoding_format,
    )


def to_json(
    settings: BenchSettings,
    samples: Mapping[str, Mapping[str, Sequence[float]]],
    checks: Mapping[str, float],
    machine: Mapping[str, Any],
) -> dict[str, Any]:
    summary = summarize(samples)
    return {
        "settings": {**settings.__dict__, "model_path": str(settings.model_path)},
        "machine": dict(machine),
        "checks": dict(checks),
        "samples_inputs_per_s": {workload: dict(rows) for workload, rows in samples.items()},
        "summary": {
            workload: {name: None if spread is None else spread.__dict__ for name, spread in row.items()}
            for workload, row in summary.items()
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        settings = settings_from_args(args)
        machine = machine_description()
        warn_if_busy(machine)
        exit_on_termination()
        samples, checks = run_bench(settings, args.log_dir)
    except (CompareError, LlamaServerError, ServerStartError, httpx.HTTPError) as exc:
        first_line, _, rest = str(exc).partition("\n")
        print(f"error: {first_line}", file=sys.stderr)
        if rest:
            print(rest, file=sys.stderr)
        return 1
    print()
    for name, value in checks.items():
        print(f"{name}: {value:.3g}")
    print(f"median over {settings.rounds} rounds (min–max), {settings.repeats} runs each; ratio: same-round")
    print(format_summary(summarize(samples), settings.n_texts))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(settings, samples, checks, machine), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
