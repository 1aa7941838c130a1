"""Decode speed over llama.cpp's RPC backend: SmolLM2 split over this process + 2 loopback workers, against all
local, and against llama.cpp's own llama-server with the same `--rpc` split.

    python -m bench.rpc [--tokens 128] [--rounds 3] [--threads 1] [--llama-server] [--json]

Two `python -m server rpc-worker` processes serve 127.0.0.1; every split run uses both. `ours-rpc` and
llama-server split alike: `--n-gpu-layers 21` (the last 20 layers and the output layer on the workers, shared
by their free memory, llama-server's semantics); `ours-rpc-planned` splits as `--auto-offload` plans
(offload/rpc.py: whole layers, the output layer's weights kept here). The workers' traffic per token is read
from their sockets (`ss -ti`), prompt included. Weights are not repacked anywhere (ours: `--extra-bufts off`;
llama-server: `--no-repack`), because the workers' CPU backend never repacks. Each round runs every
configuration once, in turn, one stream each: the decode rate is (tokens - 1) / (time of the last token - time
of the first).

`--llama-server` builds (once, cached) a llama-server with `-DGGML_RPC=ON` from the pinned sdist's vendored
llama.cpp (bench/llama_server.py's yardstick build plus that option, in its own build folder): 5-10 minutes
on 2 cores. A worker serves one client at a time, so the configurations run one after another.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.llama_server import (
    BUILD_TARGETS,
    DEFAULT_BUILD_JOBS,
    LLAMA_CPP_PYTHON_VERSION,
    CacheLayout,
    LlamaServerSettings,
    _exclusive,
    _niced,
    _run_logged,
    build_key,
    cmake_build_command,
    cmake_configure_command,
    default_cache_root,
    fetch_sdist,
    llama_server_spec,
    this_cpu_build_options,
)
from bench.process import ServerSpec, exit_on_termination, run_server

MODEL = "smollm2-135m-instruct"
N_GPU_LAYERS = 21  # SmolLM2 has 30 layers: 10 here, 20 on the workers, and the output layer
PROMPT = "Once upon a time, in a land far away, there lived"
RPC_OPTION = "-DGGML_RPC=ON"


@dataclass(frozen=True)
class Measurement:
    config: str
    round: int
    tokens: int
    decode_tok_s: float
    # bytes the workers sent and received during the request (prompt included), per generated token
    worker_bytes_per_token: float | None = None


def socket_bytes(ports: Sequence[int]) -> int:
    """Bytes sent and received on the workers' established connections (`ss -ti`: tcp_info's bytes_sent and
    bytes_received, from the workers' side): the RPC traffic, nothing else on the machine."""
    total = 0
    for port in ports:
        command = ["ss", "-tinH", "state", "established", f"( sport = :{port} )"]
        text = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        total += sum(int(n) for n in re.findall(r"bytes_(?:sent|received):(\d+)", text))
    return total


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def workers(n_workers: int, threads: int) -> Iterator[list[tuple[str, int]]]:
    """n `python -m server rpc-worker` processes on 127.0.0.1; yields their (endpoint, port) once they listen."""
    ports = [free_port() for _ in range(n_workers)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "server", "rpc-worker", "--port", str(port), "--threads", str(threads)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        for port in ports:
            _wait_listening(port)
        yield [(f"127.0.0.1:{port}", port) for port in ports]
    finally:
        for process in processes:
            process.kill()
            process.wait()


def _wait_listening(port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return
        time.sleep(0.2)
    raise RuntimeError(f"no rpc-worker listening on 127.0.0.1:{port} after {timeout_s:.0f} s")


def ours_spec(
    name: str, port: int, threads: int, endpoints: Sequence[str] = (), *, planned: bool = False
) -> ServerSpec:
    """Our server: all local, or split as llama-server splits (--n-gpu-layers), or as the planner splits."""
    command = [sys.executable, "-m", "server", "--model", MODEL, "--port", str(port), "--threads", str(threads)]
    command += ["--parallel", "1", "--ctx-size", "1024", "--extra-bufts", "off"]
    if endpoints:
        split = ["--auto-offload"] if planned else ["--n-gpu-layers", str(N_GPU_LAYERS)]
        command += ["--rpc", ",".join(endpoints), *split]
    return ServerSpec(
        name=name,
        command=tuple(command),
        base_url=f"http://127.0.0.1:{port}/v1",
        health_url=f"http://127.0.0.1:{port}/health",
    )


def llama_server_rpc_spec(
    binary: Path, model_path: Path, port: int, threads: int, endpoints: Sequence[str]
) -> ServerSpec:
    settings = LlamaServerSettings(
        binary=binary,
        model_path=model_path,
        port=port,
        threads=threads,
        parallel=1,
        ctx_size=1024,
        no_repack=True,
        extra_args=("--rpc", ",".join(endpoints), "--n-gpu-layers", str(N_GPU_LAYERS)),
    )
    return llama_server_spec(settings)


def decode_rate(base_url: str, n_tokens: int) -> tuple[int, float]:
    """One streamed completion of n_tokens (EOS ignored): (tokens generated, decode tokens per second).

    The count comes from the usage chunk: our server hands quick steps' tokens over together
    (--stream-interval-ms), so an event may hold several tokens; a choice's first token is always sent alone,
    and the last event comes with the last token, so the decode rate is (tokens - 1) / (last event - first)."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": n_tokens, "temperature": 0, "stream": True}
    body |= {"ignore_eos": True, "stream_options": {"include_usage": True}}
    stamps: list[float] = []
    n_generated: int | None = None
    with (
        httpx.Client(timeout=600, trust_env=False) as client,
        client.stream("POST", base_url + "/completions", json=body) as response,
    ):
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    stamps.append(time.perf_counter())
                if chunk.get("usage"):
                    n_generated = int(chunk["usage"]["completion_tokens"])
    n_generated = n_generated if n_generated is not None else len(stamps)
    if len(stamps) < 2:
        raise RuntimeError(f"{base_url}: fewer than 2 events streamed")
    return n_generated, (n_generated - 1) / (stamps[-1] - stamps[0])


def ensure_rpc_llama_server(cache_root: Path | None = None, jobs: int = DEFAULT_BUILD_JOBS) -> Path:
    """llama-server built with the RPC backend, in its own folder of bench/llama_server.py's cache."""
    cpu_options = (*this_cpu_build_options(), RPC_OPTION)
    layout = CacheLayout(
        root=(cache_root or default_cache_root()) / f"llama-server-{LLAMA_CPP_PYTHON_VERSION}",
        build_key=build_key(cpu_options),
    )
    if layout.binary.is_file():
        return layout.binary
    with _exclusive(layout.lock_file):
        if not layout.binary.is_file():
            source = fetch_sdist(layout)
            layout.build_log.write_text(f"building {', '.join(BUILD_TARGETS)} with RPC from {source}\n")
            _run_logged(
                _niced(cmake_configure_command(source, layout.build_dir, "Ninja", cpu_options)), layout.build_log
            )
            _run_logged(_niced(cmake_build_command(layout.build_dir, jobs)), layout.build_log)
    return layout.binary


def smollm2_path() -> Path:
    from registry.models import load_registry, resolve_model

    return Path(resolve_model(MODEL, load_registry()).path)


def run(n_tokens: int, rounds: int, threads: int, with_llama_server: bool) -> list[Measurement]:
    binary = ensure_rpc_llama_server() if with_llama_server else None
    results: list[Measurement] = []
    with workers(2, threads) as started:
        endpoints = [endpoint for endpoint, _ in started]
        ports = [port for _, port in started]
        specs = [
            ours_spec("ours-local", free_port(), threads),
            ours_spec("ours-rpc", free_port(), threads, endpoints),
            ours_spec("ours-rpc-planned", free_port(), threads, endpoints, planned=True),
        ]
        if binary is not None:
            specs.append(llama_server_rpc_spec(binary, smollm2_path(), free_port(), threads, endpoints))
        for index in range(rounds):  # alternate: every configuration once per round
            for spec in specs:
                uses_workers = spec.name != "ours-local"
                with run_server(spec):
                    before = socket_bytes(ports)
                    n_seen, rate = decode_rate(spec.base_url, n_tokens)
                    traffic = (socket_bytes(ports) - before) / n_seen if uses_workers else None
                name = "llama-server-rpc" if spec.name == "llama-server" else spec.name
                results.append(Measurement(name, index, n_seen, rate, traffic))
    return results


def summary(results: Sequence[Measurement]) -> dict[str, float]:
    by_config: dict[str, list[float]] = {}
    for item in results:
        by_config.setdefault(item.config, []).append(item.decode_tok_s)
    medians = {config: statistics.median(rates) for config, rates in by_config.items()}
    if "llama-server-rpc" in medians:
        medians["ours_rpc_over_llama_server_rpc"] = medians["ours-rpc"] / medians["llama-server-rpc"]
    medians["ours_rpc_over_ours_local"] = medians["ours-rpc"] / medians["ours-local"]
    return medians


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rpc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128, help="tokens per measured completion")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (each runs every configuration once)")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 3), help="threads per process")
    parser.add_argument("--llama-server", action="store_true", help="also llama-server --rpc (built with RPC once)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    exit_on_termination()
    results = run(args.tokens, args.rounds, args.threads, args.llama_server)
    medians = summary(results)
    if args.json:
        print(json.dumps({"runs": [vars(r) for r in results], "median": medians}, indent=2))
    else:
        for item in results:
            traffic = (
                f"  {item.worker_bytes_per_token:10.0f} B/token to+from workers" if item.worker_bytes_per_token else ""
            )
            print(
                f"round {item.round}  {item.config:<18} {item.decode_tok_s:8.1f} tok/s  ({item.tokens} tokens){traffic}"
            )
        for name, value in medians.items():
            print(f"{name:<32} {value:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
