"""`python -m server rpc-worker`: serve this machine's devices to a qwen3-local (or llama-server) main process
over llama.cpp's RPC backend, from the same installed package (no separate rpc-server binary needed).

ggml's RPC protocol has no authentication and no encryption: bind loopback (the default) and reach it through
an SSH tunnel, or bind a private address on a trusted network only (README 'Several machines (RPC)').
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from server.settings import is_loopback_host

DEFAULT_PORT = 50052  # rpc-server's default (bindings.rpc.DEFAULT_PORT; repeated so --help needs no llama.cpp)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"not a TCP port (1-65535): {text!r}")
    return int(text)


def _threads(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1: {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m server rpc-worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: 127.0.0.1).")
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"TCP port (default: {DEFAULT_PORT}).")
    parser.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="NAME",
        help="A device to serve (CPU, CUDA0, ...; repeat or comma-separate; default: every GPU, else the CPU).",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="Keep received weights (> 10 MiB each) in this directory, so that a main process that reloads the "
        "same model sends only their hashes (rpc-server -c). Default: no cache.",
    )
    parser.add_argument(
        "--threads",
        type=_threads,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="CPU threads for the CPU device (default: half the logical CPUs, like rpc-server).",
    )
    parser.add_argument("--list-devices", action="store_true", help="Print this machine's devices and exit.")
    return parser


def exposure_warning(host: str) -> str | None:
    """rpc-server's own warning (tools/rpc/rpc-server.cpp) for an address other machines can reach; the
    library function that serves does not print it, so the worker does. None on loopback."""
    from bindings.rpc import NO_AUTH_WARNING

    return None if is_loopback_host(host) else NO_AUTH_WARNING.format(host=host)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from bindings.rpc import Endpoint, GgmlRpc, RpcError  # deferred: --help needs no llama.cpp

    try:
        rpc = GgmlRpc()
        if args.list_devices:
            print("\n".join(rpc.local_device_names()))
            return 0
        devices = [name for entry in args.device for name in entry.split(",") if name]
        if args.cache_dir is not None:
            args.cache_dir.mkdir(parents=True, exist_ok=True)
        if (warning := exposure_warning(args.host)) is not None:
            print(warning, file=sys.stderr, flush=True)
        rpc.start_server(Endpoint(args.host, args.port), devices, args.cache_dir, args.threads)
    except (RpcError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # ggml_backend_rpc_start_server returns only when it could not start (it prints why: e.g. the port is taken)
    print(f"error: the RPC server could not listen on {args.host}:{args.port}", file=sys.stderr)
    return 1
