"""Start a server process, wait until it answers its health URL, and stop it again (SIGTERM, then SIGKILL).

Used for every server the comparison runs (llama-server, ours, llama-cpp-python's): each is only a
command line plus the URL that answers 200 once the model is loaded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

HEALTH_POLL_INTERVAL_S = 0.25
STOP_GRACE_S = 10.0


class ServerStartError(RuntimeError):
    """The server exited or never became healthy; the message carries the tail of its log."""


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server and where it answers."""

    name: str
    command: tuple[str, ...]
    base_url: str
    health_url: str
    env: tuple[tuple[str, str], ...] = ()
    cwd: Path | None = None
    startup_timeout_s: float = 180.0


@dataclass(frozen=True)
class RunningServer:
    spec: ServerSpec
    process: subprocess.Popen[bytes]
    log_path: Path

    def wait(self) -> int:
        return self.process.wait()


def log_tail(log_path: Path, n_chars: int = 2000) -> str:
    try:
        return log_path.read_text(errors="replace")[-n_chars:]
    except OSError:
        return ""


def wait_until_healthy(spec: ServerSpec, process: subprocess.Popen[bytes], log_path: Path) -> None:
    """Poll the health URL until it answers 200; fail early if the process dies."""
    deadline = time.monotonic() + spec.startup_timeout_s
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            exit_code = process.poll()
            if exit_code is not None:
                tail = log_tail(log_path)
                raise ServerStartError(f"{spec.name} exited with code {exit_code} while starting; log tail:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(spec.health_url).status_code == 200:
                    return
            time.sleep(HEALTH_POLL_INTERVAL_S)
    raise ServerStartError(
        f"{spec.name} was not healthy at {spec.health_url} after {spec.startup_timeout_s:.0f} s; "
        f"log tail:\n{log_tail(log_path)}"
    )


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (it may have children), SIGKILL it if it lingers."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def run_server(spec: ServerSpec, log_dir: Path | None = None) -> Iterator[RunningServer]:
    """Start the server in its own process group, yield once healthy, always stop it on exit."""
    log_folder = log_dir or Path(tempfile.gettempdir())
    log_folder.mkdir(parents=True, exist_ok=True)
    log_path = log_folder / f"bench-{spec.name}-{os.getpid()}.log"
    environment = {**os.environ, **dict(spec.env)}
    with log_path.open("wb") as log_sink:
        process = subprocess.Popen(
            spec.command,
            stdout=log_sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=environment,
            cwd=spec.cwd,
            start_new_session=True,  # own process group, so stop_process reaches its children too
        )
    try:
        wait_until_healthy(spec, process, log_path)
        yield RunningServer(spec=spec, process=process, log_path=log_path)
    finally:
        stop_process(process)


def exit_on_termination() -> None:
    """Make SIGTERM (and SIGINT, which a background job inherits as ignored) raise SystemExit, so the
    `run_server` blocks unwind and stop their servers instead of leaving them orphaned."""

    def leave(signal_number: int, _frame: object) -> None:
        raise SystemExit(128 + signal_number)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)
