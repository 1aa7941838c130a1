"""Listening beyond loopback without an API key must be a deliberate choice, in and out of Docker: the real
`python -m server` refuses it in one line before loading anything, unless QWEN3_LOCAL_ALLOW_NO_AUTH=1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server.auth.keys import add_key
from server.auth.principal import Limits
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
def test_loopback_needs_no_api_key(host: str, tmp_path: Path) -> None:
    assert exposure_error(Settings(host=host, data_dir=tmp_path)) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "example.com", ""])
def test_any_other_address_needs_a_key_or_the_explicit_flag(host: str, tmp_path: Path) -> None:
    assert exposure_error(Settings(host=host, data_dir=tmp_path)) is not None
    assert exposure_error(Settings(host=host, data_dir=tmp_path, api_key="sekret")) is None
    assert exposure_error(Settings(host=host, data_dir=tmp_path, allow_no_auth=True)) is None
    assert exposure_error(Settings(host=host, data_dir=tmp_path, api_key="")) is not None  # an empty key is no key
    assert exposure_error(Settings(host=host, data_dir=tmp_path, jwt_secret="s" * 32)) is None
    add_key(tmp_path / "keys.json", "alice", ("inference",), Limits())
    assert exposure_error(Settings(host=host, data_dir=tmp_path)) is None  # a named key counts


def run_server(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", "--port", str(free_port()), "--model", "/nonexistent/model.gguf", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_named_key_lets_the_real_server_listen_publicly(tmp_path: Path, live_cache_home: CacheHome) -> None:
    add_key(tmp_path / "keys.json", "alice", ("inference",), Limits())
    result = run_server(["--host", "0.0.0.0", "--keys-file", str(tmp_path / "keys.json")], live_cache_home.env())
    assert result.returncode == 1, result.stderr  # past the check: it failed on the model path instead
    assert "refusing" not in result.stderr and "/nonexistent/model.gguf" in result.stderr


def test_an_unreadable_key_file_stops_the_real_server_in_one_line(tmp_path: Path, live_cache_home: CacheHome) -> None:
    (tmp_path / "keys.json").write_text("{not json")
    result = run_server(["--keys-file", str(tmp_path / "keys.json")], live_cache_home.env())
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("error: cannot read the key file ")
