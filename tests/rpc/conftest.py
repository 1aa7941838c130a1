"""Two `python -m server rpc-worker` processes on 127.0.0.1, and helpers to run main servers against them.

A ggml RPC worker serves one client at a time: the tests run their --rpc servers one after the other."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import CacheHome, free_port


@dataclass
class Worker:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_worker(log_path: Path, cache_home: CacheHome, port: int | None = None, timeout_s: float = 30.0) -> Worker:
    port = port or free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "rpc-worker", "--port", str(port), "--threads", "1"],
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        env=cache_home.env(),
    )
    worker = Worker(port, process, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"rpc-worker exited with {process.returncode}:\n{worker.log()}")
        try:  # a plain connect: it takes no client slot from the worker (it never says HELLO)
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return worker
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"rpc-worker not listening after {timeout_s}s:\n{worker.log()}")


def stop_worker(worker: Worker) -> None:
    if worker.process.poll() is None:
        worker.process.kill()
    worker.process.wait()


@pytest.fixture(scope="module")
def rpc_cache_home(tmp_path_factory: pytest.TempPathFactory) -> CacheHome:
    return CacheHome(tmp_path_factory.mktemp("rpc-cache-home"))


@pytest.fixture(scope="module")
def rpc_workers(tmp_path_factory: pytest.TempPathFactory, rpc_cache_home: CacheHome) -> Iterator[list[Worker]]:
    logs = tmp_path_factory.mktemp("workers")
    workers = [start_worker(logs / f"worker{index}.log", rpc_cache_home) for index in range(2)]
    yield workers
    for worker in workers:
        stop_worker(worker)
