"""One live server (SmolLM2 through llama.cpp, `python -m server --audit-db ...`): its records carry exactly the
usage its responses report, and `python -m server audit verify` reads the same database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.integration.conftest import CacheHome, start_server, stop_server


def test_live_server_records_match_its_usage(tmp_path: Path) -> None:
    database = tmp_path / "audit.sqlite3"
    args = ["--model", "smollm2-135m-instruct", "--parallel", "2", "--ctx-size", "512", "--threads", "2"]
    args += ["--audit-db", f"sqlite:///{database}", "--data-dir", str(tmp_path / "data")]
    server = start_server(args, tmp_path / "server.log", CacheHome(tmp_path / "cache"))
    try:
        messages = [{"role": "user", "content": "Name a colour."}]
        answer = httpx.post(
            server.api_url + "/chat/completions",
            json={"messages": messages, "max_tokens": 12, "temperature": 0, "user": "carol"},
            timeout=120,
        )
        with httpx.stream(
            "POST",
            server.api_url + "/chat/completions",
            json={"messages": messages, "max_tokens": 9, "stream": True, "stream_options": {"include_usage": True}},
            timeout=120,
        ) as streamed:
            lines = [line.removeprefix("data: ") for line in streamed.iter_lines() if line.startswith("data: {")]
            stream_id = streamed.headers["x-request-id"]
    finally:
        stop_server(server)  # the writer stores what is queued on shutdown
    assert answer.status_code == 200
    env = {**os.environ, "QWEN3_LOCAL_AUDIT_DB": f"sqlite:///{database}"}
    export = subprocess.run(
        [sys.executable, "-m", "server", "audit", "export"], capture_output=True, text=True, env=env, check=True
    )
    rows = {row["request_id"]: row for row in map(json.loads, export.stdout.splitlines())}
    assert len(rows) == 2
    row, usage = rows[answer.headers["x-request-id"]], answer.json()["usage"]
    assert (row["prompt_tokens"], row["generated_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert row["output"] == answer.json()["choices"][0]["message"]["content"] and row["user"] == "carol"
    stream_usage = json.loads(lines[-1])["usage"]
    row = rows[stream_id]
    assert (row["prompt_tokens"], row["generated_tokens"]) == (
        stream_usage["prompt_tokens"],
        stream_usage["completion_tokens"],
    )
    assert row["cached_tokens"] == stream_usage["prompt_tokens_details"]["cached_tokens"]
    verify = subprocess.run(
        [sys.executable, "-m", "server", "audit", "verify"], capture_output=True, text=True, env=env, check=False
    )
    assert (verify.returncode, verify.stdout) == (0, "ok: 2 records, the hash chain is intact\n")
