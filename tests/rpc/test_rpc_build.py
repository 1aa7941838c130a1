"""The installed llama.cpp has its RPC backend, the install commands build it so, and the bindings' checks
that stand between a bad worker and ggml-rpc's process abort say what is wrong in one line."""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bindings.rpc import GgmlRpc, RpcError, parse_endpoint, probe, rpc_library_path, rpc_supported
from server.rpc.worker import exposure_warning

ROOT = Path(__file__).resolve().parents[2]
RPC_INSTALL = 'CMAKE_ARGS="-DGGML_RPC=ON" pip install --no-cache-dir -e '


def test_the_installed_llama_cpp_has_its_rpc_backend() -> None:
    assert rpc_supported(), (
        f"the installed llama-cpp-python was built without GGML_RPC ({rpc_library_path()} is missing): reinstall "
        'it with CMAKE_ARGS="-DGGML_RPC=ON" pip install --no-cache-dir --force-reinstall --no-deps '
        "llama-cpp-python==0.3.36"
    )
    rpc = GgmlRpc()  # every ggml-rpc.h function this project calls resolves, with its declared signature
    assert "CPU" in rpc.local_device_names()
    assert rpc.default_devices()


def test_readme_and_ci_install_llama_cpp_with_rpc_bypassing_the_wheel_cache() -> None:
    readme_commands = re.findall(r"```bash\n(python3 -m venv[^\n]*)\n```", (ROOT / "README.md").read_text())
    assert len(readme_commands) == 2
    assert all(RPC_INSTALL in command for command in readme_commands)
    ci_install = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.endswith("&& pytest")]
    assert ci_install == [f"{RPC_INSTALL}'.[test]' && pytest"]
    assert ci_install[0] in readme_commands[1]


def test_only_loopback_workers_run_without_the_warning() -> None:
    assert exposure_warning("127.0.0.1") is None
    assert exposure_warning("localhost") is None
    warning = exposure_warning("0.0.0.0")
    assert warning is not None and "Never expose the RPC server to an open network!" in warning


@contextmanager
def fake_worker(answer: Callable[[socket.socket], None]) -> Iterator[str]:
    """A TCP listener on 127.0.0.1 that treats one connection with `answer`."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def serve() -> None:
            connection, _ = listener.accept()
            with connection:
                answer(connection)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        yield f"127.0.0.1:{listener.getsockname()[1]}"
        thread.join(timeout=10)


def hello_reply(major: int, size: int = 28) -> Callable[[socket.socket], None]:
    def answer(connection: socket.socket) -> None:
        request = connection.recv(1 + 8 + 24)
        assert request[0] == 14 and struct.unpack("<Q", request[1:9])[0] == 24  # RPC_CMD_HELLO, its caps
        connection.sendall(struct.pack("<Q", size) + bytes([major, 0, 0, 0]) + bytes(size - 4))

    return answer


def test_probe_reads_the_protocol_version() -> None:
    with fake_worker(hello_reply(7)) as endpoint:
        assert probe(parse_endpoint(endpoint)) == (7, 0, 0)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (hello_reply(6), r"speaks protocol 6\.0\.0, this build 7\.0"),
        (hello_reply(7, size=12), r"answered the handshake with 12 bytes"),
        (lambda connection: None, r"broke off the handshake|closed the connection during the handshake"),
        (lambda connection: connection.recv(64) and None, r"closed the connection during the handshake"),
    ],
)
def test_probe_refuses_what_ggml_rpc_would_abort_on(answer: Callable[[socket.socket], None], message: str) -> None:
    with fake_worker(answer) as endpoint, pytest.raises(RpcError, match=message):
        probe(parse_endpoint(endpoint))


def busy(connection: socket.socket) -> None:
    """A worker busy with another client: the connection is accepted, the HELLO never answered."""
    connection.recv(64)
    time.sleep(1.5)


def test_a_busy_worker_times_out() -> None:
    with fake_worker(busy) as endpoint, pytest.raises(RpcError, match=r"did not answer within 0\.5 s"):
        probe(parse_endpoint(endpoint), timeout_s=0.5)


@pytest.mark.parametrize("text", ["10.0.0.2", "10.0.0.2:", ":50052", "10.0.0.2:port", "[::1]:50052", "h:70000"])
def test_endpoints_are_host_colon_port(text: str) -> None:
    with pytest.raises(ValueError, match="RPC worker"):
        parse_endpoint(text)
