"""Listening beyond loopback without an API key must be a deliberate choice, in and out of Docker: the real
`python -m server` refuses it in one line before loading anything, unless QWEN3_LOCAL_ALLOW_NO_AUTH=1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server.settings import Settings, exposure_error
from tests.integration.conftest import CacheHome, free_port, start_server, stop_server

MODEL = "smollm2-135m-instruct"


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--host", "0.0.0.0"], {}),
        (["--host", "::"], {}),
        ([], {"QWEN3_LOCAL_HOST": "0.0.0.0"}),  # what Dockerfile.cuda sets
        (["--host", "0.0.0.0", "--no-allow-no-auth"], {"QWEN3_LOCAL_ALLOW_NO_AUTH": "1"}),  # the flag wins
    ],
    ids=["flag", "ipv6-any", "env-as-in-docker", "flag-overrides-env"],
)
def test_a_public_address_without_an_api_key_is_refused_in_one_line(
    args: list[str], env: dict[str, str], live_cache_home: CacheHome
) -> None:
    # A model path that does not exist: a server that got past the check would fail on it with exit 1 instead.
    result = subprocess.run(
        [sys.executable, "-m", "server", "--port", str(free_port()), "--model", "/nonexistent/model.gguf", *args],
        env={**live_cache_home.env(), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("error: refusing to listen on ")
    assert "QWEN3_LOCAL_API_KEY" in line and "QWEN3_LOCAL_ALLOW_NO_AUTH=1" in line
    assert "model" not in line  # it stopped before resolving the model, let alone binding the port


def test_allow_no_auth_serves_on_all_interfaces(tmp_path: Path, live_cache_home: CacheHome) -> None:
    server = start_server(
        ["--host", "0.0.0.0", "--model", MODEL, "--parallel", "1", "--ctx-size", "512", "--threads", "2"],
        tmp_path / "server.log",
        live_cache_home,
        extra_env={"QWEN3_LOCAL_ALLOW_NO_AUTH": "1"},
    )
    try:
        answer = httpx.post(
            server.api_url + "/chat/completions",
            json={"messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 16, "temperature": 0},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        assert "4" in answer.json()["choices"][0]["message"]["content"]
        assert "Uvicorn running on http://0.0.0.0:" in server.log()
    finally:
        stop_server(server)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_loopback_needs_no_api_key(host: str) -> None:
    assert exposure_error(Settings(host=host)) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "example.com", ""])
def test_any_other_address_needs_a_key_or_the_explicit_flag(host: str) -> None:
    assert exposure_error(Settings(host=host)) is not None
    assert exposure_error(Settings(host=host, api_key="sekret")) is None
    assert exposure_error(Settings(host=host, allow_no_auth=True)) is None
    assert exposure_error(Settings(host=host, api_key="")) is not None  # an empty key is no key
