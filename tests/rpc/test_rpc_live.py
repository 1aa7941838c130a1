"""Two rpc-worker processes on 127.0.0.1 and a real main server: layers split over local CPU + both workers give
the greedy tokens of a single process; the plan puts layers on the workers within their budgets; a worker that
does not answer at start is one line."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.conftest import CacheHome, LiveServer, free_port, start_server, stop_server
from tests.rpc.conftest import Worker

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Once upon a time, there was a", "1, 2, 3, 4,"]
# Plain CPU buffers here too: the workers' CPU backend does not repack weights, and the comparison is exact.
COMMON = ["--parallel", "2", "--ctx-size", "512", "--threads", "1", "--extra-bufts", "off"]


@contextmanager
def serving(args: list[str], log_path: Path, cache_home: CacheHome) -> Iterator[LiveServer]:
    server = start_server([*COMMON, *args], log_path, cache_home)
    try:
        yield server
    finally:
        stop_server(server)


def greedy_tokens(server: LiveServer, max_tokens: int = 24) -> list[list[str]]:
    client = openai.OpenAI(base_url=server.api_url, api_key="unused")
    model = client.models.list().data[0].id
    answers = []
    for prompt in PROMPTS:
        completion = client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=1
        )
        logprobs = completion.choices[0].logprobs
        assert logprobs is not None and logprobs.tokens
        answers.append(logprobs.tokens)
    return answers


def rpc_args(workers: list[Worker]) -> list[str]:
    return ["--rpc", ",".join(worker.endpoint for worker in workers)]


def check_plan(server: LiveServer, n_layer: int) -> dict[str, object]:
    report = httpx.get(server.base_url + "/plan", timeout=10).json()
    plan = report["rpc_plan"]
    devices = [plan["local"], *plan["workers"]]
    assert sum(device["n_layers"] for device in devices) == n_layer
    for worker in plan["workers"]:
        assert worker["n_layers"] > 0, plan  # layers on every worker
        assert 0 < worker["weight_bytes"] + worker["state_bytes"] <= worker["budget_bytes"], plan
    assert plan["traffic_bytes_per_token"] > 0
    # what llama.cpp allocated on each worker is what the plan put there (its log gives MiB to 2 decimals)
    rounding = 0.005 * 2**20
    for check in report["rpc_memory_check"]:
        assert check["reported_weight_bytes"] == pytest.approx(check["planned_weight_bytes"], rel=0.01), check
        assert check["reported_state_bytes"] == pytest.approx(check["planned_state_bytes"], abs=rounding), check
    assert [w["endpoint"] for w in report["rpc_workers"]] == [d["device"].split("(")[1][:-1] for d in plan["workers"]]
    return plan


def test_smollm2_split_over_two_workers_matches_one_process(
    rpc_workers: list[Worker], rpc_cache_home: CacheHome, tmp_path: Path
) -> None:
    model = ["--model", "smollm2-135m-instruct"]
    with serving(model, tmp_path / "alone.log", rpc_cache_home) as server:
        alone = greedy_tokens(server)
    # llama-server's way: the last 20 layers and the output layer on the workers, split by their free memory
    manual = [*model, *rpc_args(rpc_workers), "--n-gpu-layers", "21"]
    with serving(manual, tmp_path / "manual.log", rpc_cache_home) as server:
        assert greedy_tokens(server) == alone
    planned = [*model, *rpc_args(rpc_workers), "--auto-offload"]
    with serving(planned, tmp_path / "planned.log", rpc_cache_home) as server:
        assert greedy_tokens(server) == alone
        plan = check_plan(server, n_layer=30)
        assert plan["local"]["n_layers"] > 0  # local CPU + both workers
    assert all("Accepted client connection" in worker.log() for worker in rpc_workers)


def test_tiny_qwen3next_split_over_two_workers_matches_one_process(
    rpc_workers: list[Worker], rpc_cache_home: CacheHome, tiny_qwen3next_gguf: Path, tmp_path: Path
) -> None:
    """Hybrid: recurrent (Gated DeltaNet) layers 0-2 and an attention layer 3, spread over three processes."""
    model = ["--model", str(tiny_qwen3next_gguf)]
    with serving(model, tmp_path / "alone.log", rpc_cache_home) as server:
        alone = greedy_tokens(server, max_tokens=16)
    with serving([*model, *rpc_args(rpc_workers), "--auto-offload"], tmp_path / "rpc.log", rpc_cache_home) as server:
        assert greedy_tokens(server, max_tokens=16) == alone
        plan = check_plan(server, n_layer=4)
        assert plan["local"]["n_layers"] > 0


def test_a_worker_that_does_not_answer_stops_the_start_with_one_line(rpc_cache_home: CacheHome) -> None:
    closed = f"127.0.0.1:{free_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "server", "--rpc", closed, "--port", str(free_port())],
        capture_output=True,
        text=True,
        env=rpc_cache_home.env(),
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: RPC worker {closed} is unreachable: Connection refused"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rpc", "127.0.0.1"], "is not host:port"),
        (["--rpc", "127.0.0.1:50052,"], "'' is not host:port"),
        (["--rpc-link", "fast"], "cannot read link speed 'fast'"),
    ],
)
def test_a_bad_rpc_setting_is_one_line(rpc_cache_home: CacheHome, args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server", *args], capture_output=True, text=True, env=rpc_cache_home.env()
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def test_two_models_loading_side_by_side_share_the_workers(
    rpc_workers: list[Worker], rpc_cache_home: CacheHome, tiny_qwen3next_gguf: Path, tmp_path: Path
) -> None:
    """Each model registers the same workers (once: the registry is process-wide) over one connection per
    worker, which ggml-rpc shares; a second handshake would wait for it forever."""
    models = ["--model", "smollm2-135m-instruct", "--model", str(tiny_qwen3next_gguf), "--preload", "all"]
    with serving([*models, *rpc_args(rpc_workers), "--auto-offload"], tmp_path / "two.log", rpc_cache_home) as server:
        client = openai.OpenAI(base_url=server.api_url, api_key="unused")
        for model, n_layer in (("smollm2-135m-instruct", 30), (tiny_qwen3next_gguf.stem, 4)):
            answer = client.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0)
            assert answer.usage is not None and answer.usage.completion_tokens == 4
            report = httpx.get(server.base_url + "/plan", params={"model": model}, timeout=10).json()
            assert [w["n_layers"] > 0 for w in report["rpc_plan"]["workers"]] == [True, True]
            assert sum(d["n_layers"] for d in [report["rpc_plan"]["local"], *report["rpc_plan"]["workers"]]) == n_layer
