"""bench.overhead: per-thread CPU readings, the thread map of a wrapped module, py-spy stack buckets.

Nothing here loads a model or starts a server; the wrapped-module test runs a tiny Python child.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.compare import CeilingRun
from bench.overhead import (
    GROUP_ENGINE,
    GROUP_LOOP,
    GROUP_OTHER,
    GROUP_WORKERS,
    LevelCost,
    bucket_of,
    cpu_delta_ns,
    format_costs,
    group_thread_cpu,
    read_thread_cpu_ns,
    read_thread_map,
    summarize_stacks,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

# Lines as `py-spy record --threads --format raw` writes them (one stack per line, sample count last).
PY_SPY_RAW = """\
thread (4101): engine;Thread._bootstrap (threading.py:1002);Engine._run (server/engine/engine.py:296);\
Engine._step (server/engine/engine.py:312);Engine._execute (server/engine/engine.py:324);\
LlamaBackend.decode (bindings/llama_backend.py:387) 90
thread (4101): engine;Thread._bootstrap (threading.py:1002);Engine._run (server/engine/engine.py:296);\
Engine._execute (server/engine/engine.py:326);LlamaBackend.sample (bindings/llama_backend.py:507);\
LlamaBackend._greedy_token (bindings/llama_backend.py:518) 6
thread (4101): engine;Thread._bootstrap (threading.py:1002);Engine._run (server/engine/engine.py:296);\
Scheduler.commit (server/engine/scheduler.py:400);TextStream.push (server/engine/text_stream.py:25) 3
thread (4100): MainThread;<module> (server/__main__.py:80);run (asyncio/runners.py:190);\
_streamed_body (server/api/openai.py:140);sse_event (server/api/sse.py:23);dumps (json/__init__.py:238);\
JSONEncoder.iterencode (json/encoder.py:258) 7
thread (4100): MainThread;<module> (server/__main__.py:80);H11Protocol.send (uvicorn/protocols/http/h11_impl.py:480);\
Connection.send (h11/_connection.py:512) 5
thread (4100): MainThread;<module> (server/__main__.py:80);BaseEventLoop._run_once (asyncio/base_events.py:1900) 4
thread (4100): MainThread;<module> (server/__main__.py:80);mystery (elsewhere.py:1) 1
thread (4102): asyncio_0;Thread._bootstrap (threading.py:1002);Thread.run (threading.py:982) 50
"""


def test_stacks_fall_into_the_innermost_matching_bucket() -> None:
    summary = summarize_stacks(PY_SPY_RAW)
    assert summary["engine"] == {"llama.cpp decode": 90, "sampling": 6, "detokenize": 3}
    assert summary["loop"] == {"json": 7, "uvicorn+h11": 5, "asyncio (tasks, queues, callbacks)": 4, "other": 1}
    writes = "BaseSelectorEventLoop._write_to_self (asyncio/selector_events.py:139)"
    assert bucket_of(["Engine._publish (server/engine/engine.py:382)", writes]) == "socket writes"
    assert bucket_of(["H11Protocol.send (uvicorn/x.py:1)", "_SelectorSocketTransport.write (asyncio/s.py:1)"]) == (
        "socket writes"
    )
    assert bucket_of(["Engine._dispatch (server/engine/engine.py:280)"]) == "generation/dispatch"
    assert bucket_of(["Scheduler.commit (server/engine/scheduler.py:1)", "LlamaBackend.piece (x:1)"]) == "detokenize"
    assert summarize_stacks("garbage\n\n") == {"engine": {}, "loop": {}}


def test_thread_cpu_is_grouped_by_the_python_thread_names() -> None:
    thread_map = {100: "MainThread", 101: "engine", 103: "asyncio_0"}
    delta = cpu_delta_ns({100: 1_000, 101: 5_000, 102: 0}, {100: 4_000, 101: 9_000, 102: 7_000, 103: 500, 104: 200})
    assert delta == {100: 3_000, 101: 4_000, 102: 7_000, 103: 500, 104: 200}
    assert group_thread_cpu(delta, thread_map) == {
        GROUP_LOOP: 3_000,
        GROUP_ENGINE: 4_000,
        GROUP_WORKERS: 7_200,  # threads Python did not start: llama.cpp's
        GROUP_OTHER: 500,
    }


def test_per_thread_cpu_of_a_real_process_counts_a_busy_thread() -> None:
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    worker = threading.Thread(target=spin)
    worker.start()
    try:
        before = read_thread_cpu_ns(os.getpid())
        time.sleep(0.3)
        after = read_thread_cpu_ns(os.getpid())
    finally:
        stop.set()
        worker.join()
    assert worker.native_id is not None
    assert cpu_delta_ns(before, after).get(worker.native_id, 0) > 10_000_000  # ≥ 10 ms of its 300 ms


def test_run_module_records_which_os_thread_is_which(tmp_path: Path) -> None:
    package = tmp_path / "tinyapp"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(
        "import sys, threading\n"
        "t = threading.Thread(target=lambda: print('worker', threading.get_native_id()), name='engine')\n"
        "t.start(); t.join()\n"
        "print('args', *sys.argv[1:])\n"
    )
    map_path = tmp_path / "threads.txt"
    completed = subprocess.run(
        [sys.executable, "-m", "bench.overhead", "run-module", str(map_path), "tinyapp", "--flag", "x"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO_ROOT}"},
        timeout=60,
    )
    lines = dict(line.split(" ", 1) for line in completed.stdout.splitlines())
    assert lines["args"] == "--flag x"
    names = read_thread_map(map_path)
    assert names[int(lines["worker"])] == "engine"
    assert "MainThread" in names.values()


def test_costs_are_reported_per_token() -> None:
    cost = LevelCost(
        server="ours",
        concurrency=16,
        output_tokens=1000,
        wall_s=5.0,
        thread_cpu_ns={GROUP_LOOP: 200_000_000, GROUP_ENGINE: 3_000_000_000},
        client_cpu_ns=100_000_000,
        stacks={"loop": {"json": 1, "uvicorn+h11": 3}, "engine": {}},
    )
    assert cost.tokens_per_s == pytest.approx(200.0)
    assert cost.us_per_token(cost.client_cpu_ns) == pytest.approx(100.0)
    assert cost.bucket_us_per_token() == {"loop": {"uvicorn+h11": pytest.approx(150.0), "json": pytest.approx(50.0)}}
    ceiling = CeilingRun(sequences=16, prompt_tokens=12, output_tokens=64, prefill_s=0.096, decode_s=4.0)
    text = format_costs([cost], [ceiling])
    assert "200.0 tok/s" in text and "0.80 of the ceiling" in text and "client 100 µs" in text
    assert "12 prompt + 64 output tokens: 250.0 tok/s" in text and "decode alone 256.0 tok/s" in text
    assert "uvicorn+h11 150, json 50" in text
