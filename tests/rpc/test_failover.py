"""The pieces of a lost worker's handling, without workers: Engine.abandon on an engine thread that never comes
back, the reload's command line and environment, the descriptors it closes, and RpcFailover's steps from a
loss to the exec (server/rpc/failover.py). The live path is tests/rpc/test_rpc_failure.py."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Mapping, Sequence

import pytest

from bindings.protocol import BatchEntry, SamplingParams
from bindings.rpc import WorkerLoss
from server.engine.engine import Engine, EngineConfig
from server.engine.fake_backend import FakeBackend, FakeBackendConfig
from server.engine.request import Request
from server.errors import InvalidRequestError, RpcWorkerLostError
from server.rpc.failover import RpcFailover, close_on_exec, reload_argv, reload_env
from server.settings import Settings

GREEDY = SamplingParams(temperature=0.0, max_tokens=200)
LOSS = WorkerLoss(workers=("10.0.0.3:50052",), registered=("10.0.0.2:50052", "10.0.0.3:50052"), message="ggml: lost")


class StuckBackend(FakeBackend):
    """Decodes `n_good` batches, then blocks in decode like llama_decode on a dead worker (until released)."""

    def __init__(self, n_good: int) -> None:
        super().__init__(FakeBackendConfig(n_slots=2))
        self.n_good = n_good
        self.stuck = threading.Event()
        self.release = threading.Event()

    def decode(self, entries: Sequence[BatchEntry]) -> None:
        if self.n_good == 0:
            self.stuck.set()
            self.release.wait()  # the test's end: the thread may finish
        self.n_good -= 1
        super().decode(entries)


def lost_error() -> RpcWorkerLostError:
    return RpcWorkerLostError("worker lost", retry_after_s=7)


def test_abandon_fails_running_and_queued_requests_and_later_submits_without_the_engine_thread() -> None:
    backend = StuckBackend(n_good=3)

    async def main() -> None:
        engine = Engine(backend, EngineConfig(max_batch_tokens=64))
        engine.start()
        streams = [engine.submit(Request(tuple(f"prompt {i}".encode()), GREEDY)) for i in range(3)]  # 1 queued
        received: list[list[str]] = [[] for _ in streams]

        async def read(index: int) -> BaseException | None:
            try:
                async for event in streams[index]:
                    received[index].append(event.text)
            except RpcWorkerLostError as exc:
                return exc
            return None

        readers = [asyncio.create_task(read(index)) for index in range(3)]
        await asyncio.to_thread(backend.stuck.wait, 10)
        assert backend.stuck.is_set()
        engine.abandon(lost_error)
        errors = await asyncio.wait_for(asyncio.gather(*readers), 10)
        assert all(isinstance(error, RpcWorkerLostError) and error.retry_after_s == 7 for error in errors)
        assert len({id(error) for error in errors}) == 3  # a fresh error each
        assert any(received[0]) and any(received[1])  # the tokens before the loss were delivered first
        with pytest.raises(RpcWorkerLostError):
            engine.submit(Request(b"later", GREEDY))
        with pytest.raises(RpcWorkerLostError):
            engine.embed([[1, 2]])
        stopper = threading.Thread(target=engine.stop)
        stopper.start()
        stopper.join(5)
        assert not stopper.is_alive(), "stop() must not wait for a thread that never returns"
        # the test's own cleanup (a real stuck thread goes with the process): let this one end
        engine._stopping.set()
        backend.release.set()
        assert engine._thread is not None
        await asyncio.to_thread(engine._thread.join, 10)
        assert not engine._thread.is_alive()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("argv", "workers", "expected"),
    [
        (
            ["python", "-m", "server", "--rpc", "a:1,b:2", "--auto-offload"],
            ["a:1"],
            ["python", "-m", "server", "--auto-offload", "--rpc", "a:1"],
        ),
        (["python", "-m", "server", "--rpc=a:1,b:2", "--port", "9"], [], ["python", "-m", "server", "--port", "9"]),
        (
            ["python", "-m", "server", "--rpc-link", "10Gbit"],
            ["a:1"],
            ["python", "-m", "server", "--rpc-link", "10Gbit", "--rpc", "a:1"],
        ),
        (["/venv/bin/qwen3-local", "--rpc", "a:1"], ["a:1", "b:2"], ["/venv/bin/qwen3-local", "--rpc", "a:1,b:2"]),
    ],
)
def test_reload_argv_replaces_the_worker_list(argv: list[str], workers: list[str], expected: list[str]) -> None:
    assert reload_argv(argv, workers) == expected


def test_reload_env_says_what_the_command_line_says() -> None:
    env = {"PATH": "/bin", "QWEN3_LOCAL_RPC": "a:1,b:2", "QWEN3_LOCAL_PORT": "9"}
    assert reload_env(env, ["a:1"]) == {"PATH": "/bin", "QWEN3_LOCAL_RPC": "a:1", "QWEN3_LOCAL_PORT": "9"}
    assert reload_env(env, []) == {"PATH": "/bin", "QWEN3_LOCAL_PORT": "9"}


def test_close_on_exec_covers_inherited_descriptors() -> None:
    read_end, write_end = os.pipe()
    try:
        os.set_inheritable(write_end, True)  # as a C library's socket is (ggml's are created without CLOEXEC)
        stdio = [os.get_inheritable(fd) for fd in (0, 1, 2)]
        close_on_exec()
        assert not os.get_inheritable(write_end) and not os.get_inheritable(read_end)
        assert [os.get_inheritable(fd) for fd in (0, 1, 2)] == stdio  # the new process writes to the same log
    finally:
        os.close(read_end)
        os.close(write_end)


class FakeEngine:
    def __init__(self) -> None:
        self.failures: list[RpcWorkerLostError] = []

    def abandon(self, failure: object) -> None:
        assert callable(failure)
        self.failures.append(failure())


def test_a_loss_fails_every_engine_and_an_admin_reload_execs_without_the_worker() -> None:
    engines = [FakeEngine(), FakeEngine()]
    flushed: list[bool] = []
    execs: list[tuple[str, list[str], Mapping[str, str]]] = []
    settings = Settings(rpc="10.0.0.2:50052,10.0.0.3:50052")
    failover = RpcFailover(
        settings,
        lambda: engines,
        lambda: flushed.append(True),
        replace_process=lambda path, argv, env: execs.append((path, argv, env)),
    )

    async def main() -> None:
        assert failover.health() is None
        with pytest.raises(InvalidRequestError):
            failover.reload_without_lost()
        failover._on_loss(LOSS)
        assert [len(engine.failures) for engine in engines] == [1, 1]
        assert engines[0].failures[0].code == "rpc_worker_lost" and "10.0.0.3:50052" in engines[0].failures[0].message
        health = failover.health()
        assert health is not None and health["status"] == "rpc_worker_lost" and health["workers"] == ["10.0.0.3:50052"]
        assert health["error"]["code"] == "rpc_worker_lost"
        answer = failover.reload_without_lost()
        assert answer == {"status": "reloading", "lost": ["10.0.0.3:50052"], "workers": ["10.0.0.2:50052"]}
        for _ in range(100):
            if execs:
                break
            await asyncio.sleep(0.05)
        failover.stop()

    asyncio.run(main())
    assert flushed == [True]
    [(_path, argv, env)] = execs
    assert argv[-2:] == ["--rpc", "10.0.0.2:50052"] and env["QWEN3_LOCAL_RPC"] == "10.0.0.2:50052"


def test_a_second_lost_worker_adds_to_the_first() -> None:
    failover = RpcFailover(Settings(rpc="10.0.0.2:50052,10.0.0.3:50052"), list, lambda: None)

    async def main() -> None:
        failover._on_loss(LOSS)
        failover._on_loss(WorkerLoss(workers=("10.0.0.2:50052",), registered=LOSS.registered, message="again"))
        health = failover.health()
        assert health is not None and health["workers"] == ["10.0.0.3:50052", "10.0.0.2:50052"]
        failover.stop()

    asyncio.run(main())


def test_the_hook_hands_a_loss_to_the_loop_from_another_thread_only() -> None:
    failover = RpcFailover(Settings(rpc="10.0.0.2:50052,10.0.0.3:50052"), list, lambda: None)

    async def main() -> None:
        failover.start(asyncio.get_running_loop())  # installs a real WorkerLossHook in ggml
        try:
            with pytest.raises(RuntimeError):  # parking the loop's thread would leave nobody to answer
                failover._from_ggml(LOSS)
            await asyncio.to_thread(failover._from_ggml, LOSS)
            await asyncio.sleep(0)
            assert failover.lost == LOSS
        finally:
            failover.stop()

    asyncio.run(main())
