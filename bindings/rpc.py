"""llama.cpp's RPC backend (ggml-rpc.h) through ctypes: serve this machine's devices to other machines
(`start_server`), and use other machines' workers as devices here (`add_server`, `device_memory`).

The llama-cpp-python bindings do not wrap ggml-rpc, so its functions are loaded from the library the
bindings themselves load (libggml-rpc next to libllama; only a build with `-DGGML_RPC=ON` has it).

Two traps of the C code, measured against the vendored source (ggml/src/ggml-rpc/ggml-rpc.cpp):
- connecting to an endpoint that does not answer, or that is not an RPC server of this protocol version,
  is a GGML_ABORT (rpc_dispatcher::start, "Failed to connect to ..." / "RPC handshake failed"): the whole
  process dies. `probe()` therefore does the HELLO handshake in Python first and raises RpcError instead.
- a worker that dies after that makes the client abort too (RPC_STATUS_ASSERT in rpc_dispatcher::work:
  "Remote RPC server crashed or returned malformed response"). A server installs a `WorkerLossHook`: the
  loss is handed to it and the thread that noticed it parks for good (the server then fails its requests and
  replaces its process: server/rpc/failover.py). Without one (a CLI tool), `exit_cleanly_when_a_worker_dies`
  turns it into one line and a known exit status: see its docstring for why nothing better is possible
  in-process.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp.llama_cpp as llama

from bindings.devices import _bindings_lib_dir, _c_function, _load_shared_library
from bindings.protocol import BackendError

log = logging.getLogger(__name__)

DEFAULT_PORT = 50052  # rpc-server's default
EXIT_WORKER_LOST = 3  # the main process's exit status when a worker in use died (see _on_ggml_abort)
PROBE_TIMEOUT_S = 5.0
# ggml-rpc.h / ggml-rpc.cpp / transport.h of the bound llama.cpp: the handshake a client must do first.
RPC_PROTO_MAJOR_VERSION = 7
RPC_PROTO_MINOR_VERSION = 0
_RPC_CMD_HELLO = 14
_RPC_CONN_CAPS_SIZE = 24
_HELLO_RESPONSE_SIZE = 4 + _RPC_CONN_CAPS_SIZE
# What rpc-server (tools/rpc/rpc-server.cpp) prints when it binds anything but 127.0.0.1; the library's
# ggml_backend_rpc_start_server prints nothing of the kind, so the worker prints this itself.
NO_AUTH_WARNING = (
    "\n"
    "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
    "WARNING: Host ('{host}') is != '127.0.0.1'\n"
    "         Never expose the RPC server to an open network!\n"
    "         This is an experimental feature and is not secure!\n"
    "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
)
# ggml_abort messages that mean a worker went away (ggml-rpc.cpp), as opposed to a bug.
_WORKER_FAILURE_MARKERS = ("Remote RPC server crashed", "Failed to connect to ", "RPC handshake failed")
_GGML_BACKEND_DEVICE_TYPE_CPU = 0
_GGML_BACKEND_DEVICE_TYPE_ACCEL = 3


# ggml's backend registry is process-wide C state, and ggml_backend_register is not thread-safe: this lock
# guards it (a lock, not data), as the C library's own static mutexes guard their maps.
_REGISTRATION = threading.Lock()


class RpcError(BackendError):
    """An RPC worker cannot be used (unreachable, busy, another protocol); the message is one line."""


class RpcUnavailableError(RpcError):
    """The installed llama.cpp was built without its RPC backend."""


@dataclass(frozen=True)
class Endpoint:
    """A worker's address as ggml-rpc takes it: host:port (it splits at the first ':', so no IPv6)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """`host:port` → Endpoint; ValueError saying what is wrong."""
    host, sep, port_text = text.strip().partition(":")
    if not sep or not host or ":" in port_text:
        raise ValueError(f"RPC worker {text!r} must be host:port (IPv4 address or host name)")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"RPC worker {text!r} has no valid port (1-65535)")
    return Endpoint(host, int(port_text))


def probe(endpoint: Endpoint, timeout_s: float = PROBE_TIMEOUT_S) -> tuple[int, int, int]:
    """The worker's protocol version, after the HELLO handshake ggml-rpc would do (which aborts the process
    where this raises RpcError). A worker serves one client at a time: a busy one does not answer."""
    try:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout_s)
    except TimeoutError as exc:
        raise RpcError(f"RPC worker {endpoint} is unreachable: no answer within {timeout_s:g} s") from exc
    except OSError as exc:
        raise RpcError(f"RPC worker {endpoint} is unreachable: {exc.strerror or exc}") from exc
    with sock:
        try:
            major, minor, patch = _hello(sock, endpoint)
        except TimeoutError as exc:
            raise RpcError(
                f"RPC worker {endpoint} did not answer within {timeout_s:g} s (busy with another client?)"
            ) from exc
        except OSError as exc:
            raise RpcError(
                f"RPC worker {endpoint} broke off the handshake ({exc.strerror or exc}): not a ggml RPC server?"
            ) from exc
    if major != RPC_PROTO_MAJOR_VERSION or minor > RPC_PROTO_MINOR_VERSION:
        raise RpcError(
            f"RPC worker {endpoint} speaks protocol {major}.{minor}.{patch}, this build "
            f"{RPC_PROTO_MAJOR_VERSION}.{RPC_PROTO_MINOR_VERSION}: install the same llama-cpp-python on both"
        )
    return major, minor, patch


def _hello(sock: socket.socket, endpoint: Endpoint) -> tuple[int, int, int]:
    """RPC_CMD_HELLO with no transport capabilities (plain TCP): | cmd | size | caps | → | size | version | caps |"""
    sock.sendall(struct.pack("<BQ", _RPC_CMD_HELLO, _RPC_CONN_CAPS_SIZE) + bytes(_RPC_CONN_CAPS_SIZE))
    size = struct.unpack("<Q", _receive(sock, 8, endpoint))[0]
    if size != _HELLO_RESPONSE_SIZE:
        raise RpcError(f"RPC worker {endpoint} answered the handshake with {size} bytes: not ggml-rpc v7")
    major, minor, patch = _receive(sock, size, endpoint)[:3]
    return major, minor, patch


def _receive(sock: socket.socket, size: int, endpoint: Endpoint) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise RpcError(f"RPC worker {endpoint} closed the connection during the handshake: not a ggml RPC server?")
        data += chunk
    return data


def rpc_library_path() -> Path:
    return _bindings_lib_dir() / "libggml-rpc.so"


def rpc_supported() -> bool:
    """Whether the installed llama.cpp has its RPC backend (llama_supports_rpc, and the library is there)."""
    return bool(llama.llama_supports_rpc()) and rpc_library_path().exists()


@dataclass(frozen=True)
class WorkerDevice:
    """One device a worker serves, as registered here."""

    name: str  # ggml's device name here: RPC0, RPC1, ...
    endpoint: str
    free_bytes: int
    total_bytes: int


class GgmlRpc:
    """ggml-rpc's C functions, with their signatures declared."""

    def __init__(self) -> None:
        if not rpc_supported():
            raise RpcUnavailableError(
                f"this llama.cpp build has no RPC backend ({rpc_library_path()} is missing): reinstall "
                "llama-cpp-python built with CMAKE_ARGS=-DGGML_RPC=ON (see README 'Several machines (RPC)')"
            )
        llama.llama_backend_init()
        lib_dir = _bindings_lib_dir()
        rpc = _load_shared_library(lib_dir, "ggml-rpc")
        ggml = _load_shared_library(lib_dir, "ggml")
        base = _load_shared_library(lib_dir, "ggml-base")
        pointer, text, size = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
        self._add_server = _c_function(rpc, "ggml_backend_rpc_add_server", [text], pointer)
        self._get_memory = _c_function(
            rpc,
            "ggml_backend_rpc_get_device_memory",
            [text, ctypes.c_uint32, ctypes.POINTER(size), ctypes.POINTER(size)],
            None,
        )
        self._start_server = _c_function(
            rpc, "ggml_backend_rpc_start_server", [text, text, size, size, ctypes.POINTER(pointer)], None
        )
        self._register = _c_function(ggml, "ggml_backend_register", [pointer], None)
        self._reg_count = _c_function(ggml, "ggml_backend_reg_count", [], size)
        self._reg_get = _c_function(ggml, "ggml_backend_reg_get", [size], pointer)
        self._dev_count = _c_function(ggml, "ggml_backend_dev_count", [], size)
        self._dev_get = _c_function(ggml, "ggml_backend_dev_get", [size], pointer)
        self._dev_by_name = _c_function(ggml, "ggml_backend_dev_by_name", [text], pointer)
        self._reg_dev_count = _c_function(base, "ggml_backend_reg_dev_count", [pointer], size)
        self._reg_dev_get = _c_function(base, "ggml_backend_reg_dev_get", [pointer, size], pointer)
        self._dev_name = _c_function(base, "ggml_backend_dev_name", [pointer], text)
        self._dev_type = _c_function(base, "ggml_backend_dev_type", [pointer], ctypes.c_int)
        self._dev_description = _c_function(base, "ggml_backend_dev_description", [pointer], text)
        self._set_abort_callback = _c_function(base, "ggml_set_abort_callback", [pointer], pointer)

    # --- the worker side ---------------------------------------------------------------------------
    def local_device_names(self) -> tuple[str, ...]:
        return tuple(self._dev_name(self._dev_get(i)).decode() for i in range(self._dev_count()))

    def default_devices(self) -> tuple[str, ...]:
        """What rpc-server serves by default: every GPU (neither CPU nor ACCEL device), else the CPU."""
        devices = [self._dev_get(i) for i in range(self._dev_count())]
        kinds = (_GGML_BACKEND_DEVICE_TYPE_CPU, _GGML_BACKEND_DEVICE_TYPE_ACCEL)
        gpus = [d for d in devices if self._dev_type(d) not in kinds]
        chosen = gpus or [d for d in devices if self._dev_type(d) == _GGML_BACKEND_DEVICE_TYPE_CPU][:1]
        return tuple(self._dev_name(d).decode() for d in chosen)

    def start_server(self, endpoint: Endpoint, devices: Sequence[str], cache_dir: Path | None, n_threads: int) -> None:
        """Serve `devices` (names; empty: default_devices()) on endpoint until the process ends. Blocking:
        ggml accepts one client at a time, forever."""
        names = tuple(devices) or self.default_devices()
        handles = []
        for name in names:
            handle = self._dev_by_name(name.encode())
            if not handle:
                known = ", ".join(self.local_device_names())
                raise RpcError(f"unknown device {name!r}; this machine has {known}")
            handles.append(handle)
        array = (ctypes.c_void_p * len(handles))(*handles)
        cache = str(cache_dir).encode() if cache_dir is not None else None
        self._start_server(str(endpoint).encode(), cache, n_threads, len(handles), array)

    # --- the main process side ---------------------------------------------------------------------
    def add_server(self, endpoint: Endpoint) -> tuple[WorkerDevice, ...]:
        """Register the worker's devices with ggml (as llama-server's --rpc does), so that llama.cpp places
        layers on them like on local GPUs (before the local ones: llama_prepare_model_devices)."""
        with _REGISTRATION:  # models loading side by side register the same workers: once, and in turn
            if str(endpoint) not in self.registered_endpoints():
                # Not for a registered one: this process may hold its one client connection (a loaded model),
                # and a second connection would wait for that one to close.
                probe(endpoint)
            reg = self._add_server(str(endpoint).encode())
            if not reg:
                raise RpcError(f"RPC worker {endpoint} serves no device")
            if reg not in {self._reg_get(i) for i in range(self._reg_count())}:  # add_server caches per endpoint
                self._register(reg)
        devices = []
        for index in range(self._reg_dev_count(reg)):
            free, total = self.device_memory(endpoint, index)
            name = self._dev_name(self._reg_dev_get(reg, index)).decode()
            devices.append(WorkerDevice(name=name, endpoint=str(endpoint), free_bytes=free, total_bytes=total))
        return tuple(devices)

    def registered_endpoints(self) -> tuple[str, ...]:
        """The endpoints of the registered RPC workers (an RPC device's description is its endpoint), in
        registry order, without duplicates."""
        endpoints: list[str] = []
        for index in range(self._dev_count()):
            device = self._dev_get(index)
            if self._dev_name(device).decode().startswith("RPC"):
                endpoint = (self._dev_description(device) or b"").decode()
                if endpoint and endpoint not in endpoints:
                    endpoints.append(endpoint)
        return tuple(endpoints)

    def device_memory(self, endpoint: Endpoint, device: int = 0) -> tuple[int, int]:
        """(free, total) bytes of the worker's device, as the worker reports them now."""
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        self._get_memory(str(endpoint).encode(), device, ctypes.byref(free), ctypes.byref(total))
        return int(free.value), int(total.value)

    def set_abort_callback(self, callback: Any) -> int | None:
        """Install ggml's process-wide abort callback (a ctypes function or an address); the previous one's
        address (None: ggml's default)."""
        if callback is not None and not isinstance(callback, int):
            callback = ctypes.cast(callback, ctypes.c_void_p).value
        previous: int | None = self._set_abort_callback(callback)
        return previous


def start_server(
    host: str, port: int, devices: Sequence[str] = (), cache_dir: Path | None = None, n_threads: int = 1
) -> None:
    """Run ggml's RPC server on host:port (blocking)."""
    GgmlRpc().start_server(Endpoint(host, port), devices, cache_dir, n_threads)


def add_server(endpoint: str) -> tuple[WorkerDevice, ...]:
    """Register a worker (host:port) as devices here; RpcError (one line) when it cannot be used."""
    return GgmlRpc().add_server(parse_endpoint(endpoint))


def device_memory(endpoint: str, device: int = 0) -> tuple[int, int]:
    """(free, total) bytes of a registered worker's device."""
    return GgmlRpc().device_memory(parse_endpoint(endpoint), device)


def registered_endpoints() -> tuple[str, ...]:
    """The endpoints of the RPC workers registered with ggml in this process, in registry order."""
    return GgmlRpc().registered_endpoints()


def accepts_connections(endpoint: str, timeout_s: float = 1.0) -> bool:
    """Whether something listens at endpoint (a plain connect: it takes no client slot from a worker)."""
    parsed = parse_endpoint(endpoint)
    try:
        with socket.create_connection((parsed.host, parsed.port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _dead_workers(attempts: int = 10, interval_s: float = 0.2) -> list[str]:
    """The registered workers that no longer listen. A dying worker's connection breaks a moment before its
    listening socket closes, so this looks a few times."""
    endpoints = registered_endpoints()
    for _ in range(attempts):
        dead = [endpoint for endpoint in endpoints if not accepts_connections(endpoint)]
        if dead:
            return dead
        time.sleep(interval_s)
    return []


def _worker_failure(message: bytes | None) -> str | None:
    """ggml's abort message, when it says that a worker went away (None: anything else, a bug)."""
    text = (message or b"").decode(errors="replace").strip()
    return text if any(marker in text for marker in _WORKER_FAILURE_MARKERS) else None


def _exit_worker_lost(text: str) -> None:
    dead = _dead_workers()
    who = ", ".join(dead) if dead else "(one of " + ", ".join(registered_endpoints()) + ")"
    sys.stderr.write(
        f"error: RPC worker {who} failed while in use ({text}): ggml-rpc cannot continue without it; "
        f"exiting with status {EXIT_WORKER_LOST} (restart the server: without the worker, or once it is back)\n"
    )
    sys.stderr.flush()
    os._exit(EXIT_WORKER_LOST)  # the threads that waited on the worker never return: no orderly exit


def _print_abort(message: bytes | None) -> None:
    sys.stderr.write((message or b"").decode(errors="replace").strip() + "\n")
    sys.stderr.flush()


def _on_ggml_abort(message: bytes | None) -> None:
    """ggml's abort callback (ggml_abort() calls it, then abort()). A worker's death is not a bug here: say
    which worker in one line and exit with EXIT_WORKER_LOST instead of a SIGABRT and a backtrace. Anything else
    is printed as ggml would, and ggml_abort goes on to abort()."""
    try:
        text = _worker_failure(message)
        if text is not None:
            _exit_worker_lost(text)
        _print_abort(message)
    except Exception:  # an exception must never unwind into C; ggml_abort then aborts
        log.exception("the ggml abort callback failed")


# A constant, like llama_log.LLAMA_LOG_CALLBACK: ggml keeps the pointer, so it lives as long as the module.
GGML_ABORT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p)(_on_ggml_abort)


def exit_cleanly_when_a_worker_dies() -> None:
    """Install the abort callback above, process-wide (idempotent), unless a WorkerLossHook (a server's) is
    installed: that one stays.

    What ggml-rpc does when a worker it uses dies (ggml/src/ggml-rpc/ggml-rpc.cpp): its dispatcher thread's
    next send or receive fails and `RPC_STATUS_ASSERT` (lines 566 and 569, in rpc_dispatcher::work) calls GGML_ABORT
    ("Remote RPC server crashed or returned malformed response") → ggml_abort() → abort(): the whole client
    process dies, running requests with it. Nothing in between can be caught: the abort callback runs on the
    dispatcher thread; returning from it aborts, and parking that thread instead leaves the engine thread
    blocked in llama_decode forever, with the model's buffers unfreeable (freeing them goes through the same
    dead connection). A process without a server to tell (a CLI tool) therefore ends, but deliberately: one
    line naming the worker, a known exit status for a supervisor to restart on. A server parks the thread and
    answers 503s until it replaces its own process (WorkerLossHook)."""
    rpc = GgmlRpc()
    ours = ctypes.cast(GGML_ABORT_CALLBACK, ctypes.c_void_p).value
    previous = rpc.set_abort_callback(GGML_ABORT_CALLBACK)
    if previous is not None and previous != ours:  # a hook was there first (ggml has no getter: swap back)
        rpc.set_abort_callback(previous)


@dataclass(frozen=True)
class WorkerLoss:
    """A worker in use died, as ggml-rpc noticed it."""

    workers: tuple[str, ...]  # the registered workers that stopped listening (empty: none could be told)
    registered: tuple[str, ...]  # every worker registered with ggml then
    message: str  # ggml's abort message (file:line: text)

    def who(self) -> str:
        return ", ".join(self.workers) if self.workers else "(one of " + ", ".join(self.registered) + ")"


class WorkerLossHook:
    """While installed (process-wide: the last one installed wins), a worker's death is handed to `handler`
    instead of ending the process, and the ggml thread that noticed it (rpc_dispatcher::work's, or one
    connecting) parks for good: returning would abort(). `handler` runs on that thread; it must only hand the
    loss over (asyncio's call_soon_threadsafe). If it raises, the process exits as without a hook. What waited
    on that thread (the engine thread in llama_decode) stays blocked: the caller replaces the process.

    The hook holds its C callback: keep the hook alive while it is installed."""

    def __init__(self, handler: Callable[[WorkerLoss], None]) -> None:
        self._handler = handler
        self._rpc = GgmlRpc()
        self._callback = ctypes.CFUNCTYPE(None, ctypes.c_char_p)(self._on_abort)

    def install(self) -> None:
        self._rpc.set_abort_callback(self._callback)

    def close(self) -> None:
        """Back to exiting cleanly (a parked thread stays parked)."""
        self._rpc.set_abort_callback(GGML_ABORT_CALLBACK)

    def _on_abort(self, message: bytes | None) -> None:
        try:
            text = _worker_failure(message)
            if text is None:
                _print_abort(message)
                return  # ggml_abort goes on to abort(): a bug, not a lost worker
            registered = registered_endpoints()
            loss = WorkerLoss(workers=tuple(_dead_workers()), registered=registered, message=text)
            try:
                self._handler(loss)
            except Exception:
                log.exception("the handler of a lost RPC worker failed")
                _exit_worker_lost(text)
            _park_forever()
        except Exception:  # an exception must never unwind into C; ggml_abort then aborts
            log.exception("the ggml abort callback failed")


def _park_forever() -> None:
    """Block the calling thread until the process ends (or is replaced), holding no lock and not the GIL."""
    parked = threading.Event()  # never set
    while True:
        parked.wait(3600.0)
