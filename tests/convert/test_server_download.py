"""`python -m server --model NAME` for a model still to download: the port is bound first, the loader
downloads (against the fake hub), /health reports the progress, and a name that can never resolve fails
before anything starts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_hub import FakeHub, FakeRepo

from registry.models import resolve_model
from server.boot.loader import DownloadLog, resolve_settings_model
from server.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOL_REPO = "test-org/SmolLM2-GGUF"
SMOL_FILE = "SmolLM2-135M-Instruct-Q4_1.gguf"
TINY_REPO = "test-org/Tiny-GGUF"
TINY_FILE = "Tiny-Q8_0.gguf"


def write_models_yaml(tmp_path: Path, name: str, repo: str, file_name: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(
        f"""default: {name}
models:
  {name}:
    hub:
      repo: {repo}
      default_quant: Q
      quants:
        Q: "{file_name}"
    context: 512
"""
    )
    return path


def server_env(fake_hub: FakeHub, hf_home: Path, **extra: str) -> dict[str, str]:
    """This environment without anything that would point the server at another hub, cache or settings."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("QWEN3_LOCAL_", "HF_", "HUGGINGFACE_")) and key != "TRANSFORMERS_OFFLINE"
    }
    return {
        **env,
        "HF_ENDPOINT": fake_hub.endpoint,
        "HF_HOME": str(hf_home),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------- the loader's progress, in process


class RecordingObserver:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def downloading(self, bytes_done: int, bytes_total: int) -> None:
        self.events.append((bytes_done, bytes_total))

    def downloaded(self) -> None:
        self.events.append("downloaded")


def test_download_log_logs_the_start_every_interval_and_the_end_once(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    observer = RecordingObserver()
    progress = DownloadLog("big", observer, interval_s=10.0, clock=lambda: now[0])
    with caplog.at_level("INFO", logger="server.boot.loader"):
        for at, done in [
            (0, 0),
            (1, 10 * 10**9),
            (10, 50 * 10**9),
            (12, 60 * 10**9),
            (13, 100 * 10**9),
            (30, 100 * 10**9),
        ]:
            now[0] = at
            progress(done, 100 * 10**9)
    assert [record.message for record in caplog.records] == [
        "downloading big: 0.00 of 100.00 GB (0%)",
        "downloading big: 50.00 of 100.00 GB (50%)",
        "downloading big: 100.00 of 100.00 GB (100%)",
    ]
    assert len(observer.events) == 6  # the observer (/health) hears every report
    assert progress.started


def test_resolve_settings_model_reports_the_download_then_its_end(
    fake_hub: FakeHub, hf_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = b"GGUF" + bytes(range(256)) * 400
    fake_hub.repos[TINY_REPO] = FakeRepo(files={TINY_FILE: data})
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.endpoint)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(model="tiny", models_file=write_models_yaml(tmp_path, "tiny", TINY_REPO, TINY_FILE))

    observer = RecordingObserver()
    model = resolve_settings_model(settings, observer)

    assert model.path.read_bytes() == data
    assert observer.events[0] == (0, len(data))
    assert observer.events[-2:] == [(len(data), len(data)), "downloaded"]
    again = RecordingObserver()
    assert resolve_settings_model(settings, again).path == model.path
    assert again.events == []  # found in the cache: no download to report


# ---------------------------------------------------------------- the real server


def run_server_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", "--port", str(free_port()), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_model_that_can_never_resolve_fails_before_serving_in_one_line(
    fake_hub: FakeHub, hf_home: Path, tmp_path: Path
) -> None:
    models = str(write_models_yaml(tmp_path, "smol", SMOL_REPO, SMOL_FILE))
    env = server_env(fake_hub, hf_home)

    unknown = run_server_cli(["--model", "nope", "--models-file", models], env)
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "error: unknown model 'nope'; models.yaml knows: smol"

    offline = run_server_cli(["--model", "smol", "--models-file", models], {**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 1
    assert offline.stderr.strip() == (
        "error: model 'smol' is not downloaded yet and offline mode is on (HF_HUB_OFFLINE=1); "
        "run: python -m convert pull smol"
    )

    no_downloads = run_server_cli(["--model", "smol", "--models-file", models, "--no-allow-download"], env)
    assert no_downloads.returncode == 1
    assert "downloads are turned off" in no_downloads.stderr and no_downloads.stderr.strip().count("\n") == 0
    assert fake_hub.log == []  # none of them asked the hub anything


def test_a_download_that_fails_ends_the_server_with_the_reason(
    fake_hub: FakeHub, hf_home: Path, tmp_path: Path
) -> None:
    models = str(write_models_yaml(tmp_path, "smol", SMOL_REPO, SMOL_FILE))  # the hub has no such repository
    failed = run_server_cli(["--model", "smol", "--models-file", models], server_env(fake_hub, hf_home))
    assert failed.returncode == 1
    last_line = failed.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: the model failed to load: PullError: cannot list {SMOL_REPO}@main on ")
    assert "Traceback" not in failed.stderr  # an expected failure, said in words
    assert "Uvicorn running on" in failed.stderr  # it was served while downloading


@pytest.fixture
def downloading_server(
    fake_hub: FakeHub, hf_home: Path, tmp_path: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes], Path, int]]:
    """`python -m server --model smol` with SmolLM2's GGUF only on the (throttled) fake hub."""
    data = resolve_model("smollm2-135m-instruct").path.read_bytes()
    # ~5 s for 98 MB: huggingface-hub reports every 10 MiB, so /health sees bytes_done grow several times
    fake_hub.repos[SMOL_REPO] = FakeRepo(files={SMOL_FILE: data}, throttle_bytes_per_s=20e6)
    models = write_models_yaml(tmp_path, "smol", SMOL_REPO, SMOL_FILE)
    port = free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "server", "--model", "smol", "--models-file", str(models),
                "--host", "127.0.0.1", "--port", str(port), "--parallel", "2", "--ctx-size", "256",
                "--extra-bufts", "off", "--cache-dir", str(tmp_path / "cache"),
            ],
            cwd=REPO_ROOT,
            env=server_env(fake_hub, hf_home),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}", process, log_path, len(data)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_server_binds_first_and_reports_the_download_on_health(
    downloading_server: tuple[str, subprocess.Popen[bytes], Path, int],
) -> None:
    base_url, process, log_path, size = downloading_server
    seen: list[tuple[int, dict[str, Any]]] = []
    deadline = time.monotonic() + 300  # a guard against a hang, not a speed requirement
    while time.monotonic() < deadline:
        try:
            response = httpx.get(base_url + "/health", timeout=5.0)
        except httpx.TransportError:  # not listening yet
            assert process.poll() is None, log_path.read_text(errors="replace")
            time.sleep(0.05)
            continue
        seen.append((response.status_code, response.json()))
        if response.status_code == 200:
            break
        assert response.status_code == 503, response.text
        assert response.json()["status"] in ("downloading", "loading"), response.text
        time.sleep(0.05)
    log = log_path.read_text(errors="replace")
    assert seen and seen[-1] == (200, {"status": "ok"}), log

    downloading = [body for status, body in seen if body["status"] == "downloading"]
    for body in downloading:
        assert body == {
            "status": "downloading",
            "progress": {"bytes_done": body["progress"]["bytes_done"], "bytes_total": size},
        }
    done = [body["progress"]["bytes_done"] for body in downloading]
    assert done == sorted(done) and len(set(done)) >= 3, seen  # bytes_done grows while the port answers
    assert done[0] < size
    statuses = [body["status"] for _, body in seen]
    # downloading, then loading (maybe too short to be seen), then ok: never back
    first_after = [status for status in statuses[statuses.index("downloading") :] if status != "downloading"]
    assert set(first_after[:-1]) <= {"loading"} and first_after[-1] == "ok"

    assert "model smol is not downloaded yet" in log
    assert f"downloading smol: 0.00 of {size / 1e9:.2f} GB (0%)" in log
    assert f"downloading smol: {size / 1e9:.2f} of {size / 1e9:.2f} GB (100%)" in log

    chat = httpx.post(
        base_url + "/v1/chat/completions",
        json={
            "model": "smol",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8,
            "temperature": 0,
        },
        timeout=120.0,
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"].strip()
