"""A real `python -m server` process on 127.0.0.1 serving SmolLM2, shared by the live tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

N_SLOTS = 16
CTX_PER_SLOT = 1024


@dataclass(frozen=True)
class LiveServer:
    base_url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def api_url(self) -> str:
        return self.base_url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(args: list[str], log_path: Path, timeout_s: float = 120.0) -> LiveServer:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), *args],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
    )
    server = LiveServer(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.base_url + "/health", timeout=1.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"server not ready after {timeout_s}s:\n{server.log()}")


def stop_server(server: LiveServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def smollm2_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    server = start_server(
        [
            "--model",
            "smollm2-135m-instruct",
            "--parallel",
            str(N_SLOTS),
            "--ctx-size",
            str(CTX_PER_SLOT),
            "--threads",
            "2",
            "--max-queue",
            "64",
        ],
        log_path,
    )
    yield server
    stop_server(server)
    # uvicorn re-raises SIGTERM after its graceful shutdown, so a clean stop reads as -SIGTERM
    assert server.process.returncode in (0, -signal.SIGTERM), server.log()
