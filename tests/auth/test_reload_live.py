"""SIGHUP to a live `python -m server` swaps its keys and limits while a stream is in flight: the stream
finishes whole, the revoked key stops working, the new key and its limit apply, and no key reaches the log."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from server.auth.keys import revoke_key
from tests.auth.conftest import bearer, make_key
from tests.integration.conftest import CacheHome, start_server, stop_server

MODEL = "smollm2-135m-instruct"
STREAM = {
    "messages": [{"role": "user", "content": "Count from 1 to 200, separated by commas."}],
    "max_tokens": 160,
    "temperature": 0,
    "ignore_eos": True,  # the stream must outlast the reload
    "stream": True,
    "stream_options": {"include_usage": True},
}


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory: pytest.TempPathFactory) -> CacheHome:
    return CacheHome(tmp_path_factory.mktemp("auth-cache-home"))


def wait_until_accepted(url: str, key: str, timeout_s: float = 20.0) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        response = httpx.get(url + "/v1/models", headers=bearer(key), timeout=10)
        if response.status_code != 401 or time.monotonic() > deadline:
            return response
        time.sleep(0.1)


def test_sighup_reloads_keys_without_dropping_a_stream(tmp_path: Path, cache_home: CacheHome) -> None:
    keys_file = tmp_path / "keys.json"
    old = make_key(keys_file, "old", "inference")
    args = ["--model", MODEL, "--parallel", "2", "--ctx-size", "512", "--threads", "2", "--keys-file", str(keys_file)]
    server = start_server(args, tmp_path / "server.log", cache_home)
    new = ""
    try:
        chunks: list[dict[str, object]] = []
        with httpx.stream(
            "POST", server.api_url + "/chat/completions", json=STREAM, headers=bearer(old), timeout=120
        ) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[len("data: ") :]))
                    break
            # mid-stream: revoke the streaming key, add another with a limit of its own, and signal the server
            revoke_key(keys_file, "old")
            new = make_key(keys_file, "new", "inference", rpm=2)
            os.kill(server.process.pid, signal.SIGHUP)
            assert wait_until_accepted(server.base_url, new).status_code == 200
            assert httpx.get(server.api_url + "/models", headers=bearer(new), timeout=10).status_code == 200
            refused = httpx.get(server.api_url + "/models", headers=bearer(new), timeout=10)
            assert refused.status_code == 429 and refused.headers["x-ratelimit-limit-requests"] == "2"
            assert httpx.get(server.api_url + "/models", headers=bearer(old), timeout=10).status_code == 401
            done = False
            for line in lines:
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunks.append(json.loads(line[len("data: ") :]))
        assert done, "the stream was cut short"
        assert all("error" not in chunk for chunk in chunks)
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]  # type: ignore[index]
        assert finish[-1] == "length"
        usage = [c["usage"] for c in chunks if c.get("usage")]
        assert usage and usage[-1]["completion_tokens"] == 160, "every token of the 160 arrived"  # type: ignore[index]
        assert server.process.poll() is None
        log = server.log()
        assert "auth reloaded: 1 active keys" in log
    finally:
        stop_server(server)
    log = server.log()
    for secret in (old, new):
        assert secret and secret not in log
