"""`python -m server keys add|list|revoke`: manage the named API keys in the key file.

The file is the server's (--keys-file, QWEN3_LOCAL_KEYS_FILE, else DATA_DIR/keys.json); a running server
picks up changes on SIGHUP. `add` prints the new key once: only its SHA-256 is kept.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from server.auth.keys import KeyStoreError, add_key, load_keys, revoke_key
from server.auth.principal import SCOPES, Limits
from server.settings import ENV_PREFIX, Settings


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m server keys", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--keys-file", type=Path, help=f"The key file (default: {ENV_PREFIX}KEYS_FILE, else DATA_DIR/keys.json)."
    )
    parser.add_argument("--data-dir", type=Path, help=f"The server's data directory (default: {ENV_PREFIX}DATA_DIR).")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="Make a key and print it (once).")
    add.add_argument("name")
    add.add_argument(
        "--scope",
        action="append",
        choices=SCOPES,
        dest="scopes",
        help="A scope it grants (repeat; default: inference).",
    )
    add.add_argument("--rpm", type=_positive, help="Its requests per minute (default: the server's --rate-limit-rpm).")
    add.add_argument("--tpm", type=_positive, help="Its tokens per minute (default: the server's --rate-limit-tpm).")
    commands.add_parser("list", help="The keys: name, scopes, limits, created, revoked (never the keys).")
    revoke = commands.add_parser("revoke", help="Revoke a key (its name stays taken).")
    revoke.add_argument("name")
    return parser


def _keys_file(args: argparse.Namespace) -> Path:
    overrides = {name: getattr(args, name) for name in ("keys_file", "data_dir") if getattr(args, name) is not None}
    return Settings(**overrides).effective_keys_file()


def _when(timestamp: float | None) -> str:
    return "-" if timestamp is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _list(path: Path) -> None:
    records = load_keys(path)
    if not records:
        print(f"no keys in {path}")
        return
    print(f"{'NAME':<24} {'SCOPES':<18} {'RPM':>6} {'TPM':>8}  {'CREATED':<20}  REVOKED")
    for r in records:
        limits = f"{r.rpm if r.rpm is not None else '-':>6} {r.tpm if r.tpm is not None else '-':>8}"
        print(f"{r.name:<24} {','.join(r.scopes):<18} {limits}  {_when(r.created):<20}  {_when(r.revoked)}")


def _run(args: argparse.Namespace) -> None:
    path = _keys_file(args)
    if args.command == "add":
        scopes = tuple(dict.fromkeys(args.scopes or ["inference"]))
        key = add_key(path, args.name, scopes, Limits(args.rpm, args.tpm))
        print(key)
        print(
            f"added {args.name!r} ({', '.join(scopes)}) to {path}: this is the only time the key is shown",
            file=sys.stderr,
        )
    elif args.command == "list":
        _list(path)
    else:
        revoke_key(path, args.name)
        print(f"revoked {args.name!r} in {path}; send SIGHUP to a running server to apply it now", file=sys.stderr)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        _run(args)
    except KeyStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ValidationError, OSError) as exc:
        print(f"error: {exc.errors()[0]['msg'] if isinstance(exc, ValidationError) else exc}", file=sys.stderr)
        return 1
    return 0
