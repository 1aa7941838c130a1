"""A worker that dies mid-run (issue 14): fail what runs with 503s, say so in /health, and reload.

ggml-rpc cannot go on without a worker it placed layers on, and nothing of the model can be freed in-process:
the engine thread stays blocked in llama_decode on the dead worker's connection, and freeing the buffers goes
through that connection too (bindings/rpc.py). So, with `--rpc`, the server installs a WorkerLossHook: ggml's
thread that noticed the loss hands it here (on the event loop) and parks; then
- every running and queued request of every engine fails at once with a 503 (RpcWorkerLostError: streams get
  an error event), every new one too, with Retry-After (Engine.abandon);
- GET /health answers 503 {"status": "rpc_worker_lost", "workers": [...], "error": {...}};
- the server reloads: it replaces its own process (execve of the same interpreter and command line, with the
  `--rpc` list it should now use), which re-plans (--auto-offload) over the workers it has. Without the lost
  worker when an admin says so (POST /admin/reload); with it when it listens again (a watcher probes it every
  WATCH_INTERVAL_S). Before the exec the audit log is flushed (bounded), and every descriptor is made
  close-on-exec: the listening socket (the new process binds the same port), the clients' connections, and
  ggml's connections to the workers that are left (a worker serves one client at a time: an inherited
  connection would keep the new process waiting on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.errors import InvalidRequestError, RpcWorkerLostError

if TYPE_CHECKING:
    from bindings.rpc import WorkerLoss, WorkerLossHook
    from server.api.state import ServerState
    from server.engine.engine import Engine
    from server.settings import Settings

log = logging.getLogger(__name__)

RETRY_AFTER_S = 10  # a reload takes about as long as a start: the model loads again
WATCH_INTERVAL_S = 1.0  # how often a lost worker is probed
RELOAD_DELAY_S = 0.3  # the admin's answer and the last 503s go out before the process is replaced
AUDIT_FLUSH_TIMEOUT_S = 5.0
RPC_FLAG = "--rpc"

Exec = Callable[[str, list[str], Mapping[str, str]], None]


class RpcFailover:
    """What the app does about a lost RPC worker (the module docstring says what). Held by the app
    (`app.state.rpc_failover`); touched on the event loop only, but for the hook's hand-over (`_from_ggml`).
    Inert for a server without --rpc."""

    def __init__(
        self,
        settings: Settings,
        engines: Callable[[], Iterable[Engine]],
        flush: Callable[[], None],
        *,
        replace_process: Exec = os.execve,
    ) -> None:
        """`engines()`: the engines to fail; `flush()`: what must reach the disk before the exec (the audit
        writer's stop, bounded); `replace_process(path, argv, env)`: os.execve (tests may watch it)."""
        self.settings = settings
        self._engines = engines
        self._flush = flush
        self._replace_process = replace_process
        self.lost: WorkerLoss | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._hook: WorkerLossHook | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._reloading = False

    @classmethod
    def of_state(cls, state: ServerState) -> RpcFailover:
        def engines() -> list[Engine]:
            return [slot.engine for slot in state.fleet.slots.values() if slot.engine is not None]

        def flush() -> None:
            if state.audit is not None:
                state.audit.stop(AUDIT_FLUSH_TIMEOUT_S)

        return cls(state.settings, engines, flush)

    @property
    def active(self) -> bool:
        return bool(self.settings.rpc)

    # --- from ggml to the event loop -----------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Catch a lost worker from now on (before any model loads: loading registers the workers)."""
        if not self.active:
            return
        from bindings.rpc import WorkerLossHook  # deferred: it imports llama.cpp, which loads slowly

        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._hook = WorkerLossHook(self._from_ggml)
        self._hook.install()

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._hook is not None:
            self._hook.close()

    def _from_ggml(self, loss: WorkerLoss) -> None:
        """On ggml's thread: hand over, nothing more. Raising makes the hook exit the process instead: when the
        loop is closed, or when this is the loop's own thread (parking it would leave nobody to answer)."""
        if self._loop is None or threading.get_ident() == self._loop_thread:
            raise RuntimeError("a lost RPC worker was noticed on the event loop's thread")
        self._loop.call_soon_threadsafe(self._on_loss, loss)

    def _on_loss(self, loss: WorkerLoss) -> None:
        self.lost = _merged(self.lost, loss)
        log.error(
            "RPC worker %s failed while in use (%s): failing every request with 503 until the server reloads "
            "(POST /admin/reload: without it; or by itself once it listens again)",
            self.lost.who(),
            loss.message,
        )
        for engine in self._engines():
            engine.abandon(self.error)
        if not self._tasks and self.lost.workers:
            self._spawn(self._watch())

    def error(self) -> RpcWorkerLostError:
        who = self.lost.who() if self.lost is not None else "?"
        return RpcWorkerLostError(
            f"RPC worker {who} was lost while in use; the server reloads without it when told to "
            "(POST /admin/reload) or with it once it is back. Retry later.",
            retry_after_s=RETRY_AFTER_S,
        )

    def health(self) -> dict[str, Any] | None:
        """GET /health's 503 body while a worker is lost; None otherwise."""
        if self.lost is None:
            return None
        error = self.error()
        return {
            "status": "rpc_worker_lost",
            "workers": list(self.lost.workers),
            "message": self.lost.message,
            "error": {"message": error.message, "type": error.error_type, "param": None, "code": error.code},
        }

    # --- reloading -----------------------------------------------------------------------------------
    def reload_without_lost(self) -> dict[str, Any]:
        """POST /admin/reload: replace the process with one over the workers left (answered first)."""
        if self.lost is None:
            raise InvalidRequestError("no RPC worker is lost: there is nothing to reload", code="nothing_to_reload")
        if not self.lost.workers:
            raise InvalidRequestError(
                f"which RPC worker failed could not be told (all of {', '.join(self.lost.registered)} still "
                "listen): restart the server with the --rpc list it should use",
                code="lost_worker_unknown",
            )
        kept = tuple(w for w in self.settings.rpc_endpoints() if w not in self.lost.workers)
        self._spawn(self._reload(kept))
        return {"status": "reloading", "lost": list(self.lost.workers), "workers": list(kept)}

    async def _watch(self) -> None:
        """Reload with every worker once each lost one listens again."""
        assert self.lost is not None
        from bindings.rpc import accepts_connections

        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            back = await asyncio.gather(*(asyncio.to_thread(accepts_connections, w) for w in self.lost.workers))
            if all(back):
                log.warning("RPC worker %s is back: reloading with it", self.lost.who())
                await self._reload(self.settings.rpc_endpoints())
                return

    async def _reload(self, workers: Sequence[str]) -> None:
        if self._reloading:
            return
        self._reloading = True
        await asyncio.sleep(RELOAD_DELAY_S)
        with contextlib.suppress(TimeoutError):  # a stuck audit store must not keep the server down
            await asyncio.wait_for(asyncio.to_thread(self._flush), AUDIT_FLUSH_TIMEOUT_S + 1.0)
        argv = reload_argv(sys.orig_argv, workers)
        env = reload_env(os.environ, workers)
        log.warning("replacing this process to reload over RPC workers [%s]: %s", ", ".join(workers), " ".join(argv))
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        close_on_exec()
        self._replace_process(sys.executable, argv, env)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _merged(previous: WorkerLoss | None, loss: WorkerLoss) -> WorkerLoss:
    """A second worker lost before the reload adds to the first (each dispatcher aborts on its own)."""
    if previous is None:
        return loss
    from bindings.rpc import WorkerLoss

    workers = tuple(dict.fromkeys((*previous.workers, *loss.workers)))
    return WorkerLoss(workers=workers, registered=previous.registered, message=previous.message)


def reload_argv(argv: Sequence[str], workers: Sequence[str]) -> list[str]:
    """The command line (sys.orig_argv: interpreter, options, `-m server` or the script, flags) with its
    `--rpc` replaced by `workers` (none: no --rpc; the environment's is dropped too, see reload_env)."""
    kept: list[str] = []
    skip_value = False
    for index, arg in enumerate(argv):
        if skip_value:
            skip_value = False
        elif index > 0 and arg == RPC_FLAG:
            skip_value = True
        elif index == 0 or not arg.startswith(RPC_FLAG + "="):
            kept.append(arg)
    return [*kept, RPC_FLAG, ",".join(workers)] if workers else kept


def reload_env(env: Mapping[str, str], workers: Sequence[str]) -> dict[str, str]:
    """The environment for the new process: QWEN3_LOCAL_RPC says the same as the command line's --rpc."""
    from server.settings import ENV_PREFIX

    name = f"{ENV_PREFIX}RPC"
    new = {key: value for key, value in env.items() if key != name}
    if workers:
        new[name] = ",".join(workers)
    return new


def close_on_exec() -> None:
    """Every descriptor but stdin/stdout/stderr closes at the exec (ggml's sockets are not created so)."""
    for fd in _open_descriptors():
        if fd > 2:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)


def _open_descriptors() -> list[int]:
    fd_dir = Path("/proc/self/fd")
    if fd_dir.is_dir():
        return [int(name) for name in os.listdir(fd_dir) if name.isdigit()]
    return list(range(os.sysconf("SC_OPEN_MAX")))


def app_failover(app: Any) -> RpcFailover | None:
    """The app's RpcFailover (None for an app built without one)."""
    failover = getattr(app.state, "rpc_failover", None)
    return failover if isinstance(failover, RpcFailover) else None
