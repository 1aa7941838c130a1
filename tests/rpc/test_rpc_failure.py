"""A worker that dies mid-stream. ggml-rpc cannot go on without it (ggml-rpc.cpp:566/569, RPC_STATUS_ASSERT in
rpc_dispatcher::work), and nothing of the model can be freed in-process; the server fails every request with an
OpenAI-shaped 503, /health names the worker, and the server replaces its own process: without the worker when
an admin says so, with it once it listens again (server/rpc/failover.py). The new process (same pid, same port)
re-plans and answers the greedy tokens of a single process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from bindings.rpc import EXIT_WORKER_LOST
from tests.integration.conftest import CacheHome, LiveServer, start_server, stop_server
from tests.rpc.conftest import Worker, start_worker, stop_worker

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
# Plain CPU buffers: the workers' CPU backend does not repack weights, and the comparison is exact.
ARGS = ["--model", MODEL, "--parallel", "2", "--ctx-size", "512", "--threads", "1", "--extra-bufts", "off"]
PROMPT = "The capital of France is"
RELOAD_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def single_process_tokens(tmp_path_factory: pytest.TempPathFactory, rpc_cache_home: CacheHome) -> list[str]:
    server = start_server(ARGS, tmp_path_factory.mktemp("alone") / "alone.log", rpc_cache_home)
    try:
        return greedy_tokens(server)
    finally:
        stop_server(server)


@pytest.fixture
def two_workers(tmp_path: Path, rpc_cache_home: CacheHome) -> Iterator[list[Worker]]:
    workers = [start_worker(tmp_path / f"worker{index}.log", rpc_cache_home) for index in range(2)]
    yield workers
    for worker in workers:
        stop_worker(worker)


def greedy_tokens(server: LiveServer) -> list[str]:
    client = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=60)
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, logprobs=1)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens
    return logprobs.tokens


def serve_over(workers: list[Worker], log_path: Path, cache_home: CacheHome) -> LiveServer:
    endpoints = ",".join(worker.endpoint for worker in workers)
    return start_server([*ARGS, "--rpc", endpoints, "--auto-offload"], log_path, cache_home)


def lose_a_worker_mid_stream(server: LiveServer, worker: Worker) -> None:
    """Kill `worker` while a long greedy answer streams: the stream ends with an error event, new requests get
    503 with Retry-After, /health is 503 naming the worker; the process lives on."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True}
    events: list[str] = []
    with httpx.stream("POST", server.api_url + "/completions", json={**body, "ignore_eos": True}, timeout=60) as answer:
        assert answer.status_code == 200
        for line in answer.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                if len(events) == 3:
                    worker.process.kill()
    assert len(events) >= 5 and events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and error["code"] == "rpc_worker_lost", error
    assert worker.endpoint in error["message"]
    assert all("choices" in json.loads(event) for event in events[:-2])  # tokens until the worker died

    refused = httpx.post(server.api_url + "/completions", json={**body, "stream": False, "max_tokens": 4}, timeout=30)
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"].isdigit()
    assert refused.json()["error"]["code"] == "rpc_worker_lost"
    client = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.InternalServerError) as raised:  # what an OpenAI client makes of it
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert raised.value.status_code == 503

    health = httpx.get(server.base_url + "/health", timeout=10)
    assert health.status_code == 503
    assert health.json()["status"] == "rpc_worker_lost" and health.json()["workers"] == [worker.endpoint]
    assert server.process.poll() is None


def wait_until_reloaded(server: LiveServer, pid: int) -> None:
    """The same process (execve keeps the pid) answers /health 200 again on the same port."""
    deadline = time.monotonic() + RELOAD_TIMEOUT_S
    while time.monotonic() < deadline:
        assert server.process.poll() is None, server.log()
        try:
            if httpx.get(server.base_url + "/health", timeout=1.0).status_code == 200:
                assert server.process.pid == pid
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"not reloaded after {RELOAD_TIMEOUT_S}s:\n{server.log()}")


def planned_workers(server: LiveServer) -> list[str]:
    report = httpx.get(server.base_url + "/plan", timeout=10).json()
    assert all(worker["n_layers"] > 0 for worker in report["rpc_plan"]["workers"]), report["rpc_plan"]
    return [worker["endpoint"] for worker in report["rpc_workers"]]


def test_a_lost_worker_gives_503s_and_an_admin_reload_replans_without_it(
    two_workers: list[Worker], single_process_tokens: list[str], rpc_cache_home: CacheHome, tmp_path: Path
) -> None:
    server = serve_over(two_workers, tmp_path / "main.log", rpc_cache_home)
    try:
        nothing = httpx.post(server.base_url + "/admin/reload", timeout=10)
        assert nothing.status_code == 400 and nothing.json()["error"]["code"] == "nothing_to_reload"
        lose_a_worker_mid_stream(server, two_workers[1])
        reload = httpx.post(server.base_url + "/admin/reload", timeout=10)
        assert reload.status_code == 200, reload.text
        assert reload.json() == {
            "status": "reloading",
            "lost": [two_workers[1].endpoint],
            "workers": [two_workers[0].endpoint],
        }
        wait_until_reloaded(server, server.process.pid)
        assert planned_workers(server) == [two_workers[0].endpoint]
        assert greedy_tokens(server) == single_process_tokens
        assert "replacing this process to reload over RPC workers" in server.log()
    finally:
        stop_server(server)


def test_a_lost_worker_that_returns_brings_the_server_back_with_it(
    two_workers: list[Worker], single_process_tokens: list[str], rpc_cache_home: CacheHome, tmp_path: Path
) -> None:
    server = serve_over(two_workers, tmp_path / "main.log", rpc_cache_home)
    try:
        lost = two_workers[1]
        lose_a_worker_mid_stream(server, lost)
        stop_worker(lost)
        two_workers[1] = start_worker(tmp_path / "worker1-again.log", rpc_cache_home, port=lost.port)
        wait_until_reloaded(server, server.process.pid)
        assert planned_workers(server) == [w.endpoint for w in two_workers]
        assert greedy_tokens(server) == single_process_tokens
    finally:
        stop_server(server)


def test_without_a_server_a_lost_worker_ends_the_process_with_one_line(
    two_workers: list[Worker], tmp_path: Path
) -> None:
    """No WorkerLossHook (a tool, not the server): exit status 3 and one line naming the worker."""
    stderr_path = tmp_path / "stderr.log"
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.rpc.decode_over_workers", *(worker.endpoint for worker in two_workers)],
        stdout=subprocess.PIPE,
        stderr=stderr_path.open("wb"),
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "decoding\n"
        time.sleep(0.3)
        two_workers[1].process.kill()
        assert child.wait(timeout=60) == EXIT_WORKER_LOST
    finally:
        child.kill()
        child.wait()
    lines = [line for line in stderr_path.read_text().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1
    assert lines[0].startswith(f"error: RPC worker {two_workers[1].endpoint} failed while in use (")
    assert re.search(r"ggml-rpc\.cpp:56[69]: Remote RPC server crashed or returned malformed response", lines[0])
