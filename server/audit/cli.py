"""`python -m server audit verify|export|prune`: the compliance officer's tools. They read the server's own
settings (--audit-db / QWEN3_LOCAL_AUDIT_DB, else the SQLite file under the data directory)."""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from pydantic import ValidationError

from server.audit.record import canonical_json
from server.audit.store import COLUMNS, AuditStore
from server.settings import ENV_PREFIX, Settings


class CliError(Exception):
    """A bad argument or an unreachable database: one line on stderr, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m server audit", description="Verify and export the audit log.")
    parser.add_argument("--audit-db", help=f"audit database URL (default: {ENV_PREFIX}AUDIT_DB, else the data dir's)")
    parser.add_argument("--data-dir", help=f"the server's data directory (default: {ENV_PREFIX}DATA_DIR)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("verify", help="walk the hash chain; report the first broken link (exit 1)")
    export = commands.add_parser("export", help="records in chain order, as JSON lines or CSV, on stdout")
    export.add_argument("--since", help="from this time on (ISO 8601, e.g. 2026-01-31 or 2026-01-31T12:00Z)")
    export.add_argument("--until", help="before this time (ISO 8601)")
    export.add_argument("--user", help="only the requests with this OpenAI `user`")
    export.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    prune = commands.add_parser("prune", help="delete records older than --days (the chain stays verifiable)")
    prune.add_argument("--days", type=int, help="default: --audit-retention-days")
    return parser


def _audit_db(args: argparse.Namespace) -> tuple[str, Settings]:
    overrides = {name: value for name in ("audit_db", "data_dir") if (value := getattr(args, name)) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise CliError(str(exc.errors()[0]["msg"])) from exc
    return settings.audit_db or f"sqlite:///{settings.data_dir / 'audit.sqlite3'}", settings


def iso_time(text: str | None) -> str | None:
    """An ISO 8601 date or time as the log stores it (UTC, so that strings compare in time order)."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise CliError(f"not an ISO 8601 date or time: {text!r}") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def verify(store: AuditStore, out: TextIO) -> int:
    checked, broken = store.verify()
    if broken is None:
        print(f"ok: {checked} records, the hash chain is intact", file=out)
        return 0
    print(
        f"broken: record {broken.seq} (request {broken.request_id}): {broken.reason}; "
        f"the {checked} records before it verify",
        file=out,
    )
    return 1


def export(rows: Iterable[dict[str, Any]], fmt: str, out: TextIO) -> int:
    if fmt == "jsonl":
        for row in rows:
            out.write(canonical_json(row) + "\n")
        return 0
    writer = csv.DictWriter(out, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return 0


def _run(args: argparse.Namespace, out: TextIO) -> int:
    url, settings = _audit_db(args)
    store = AuditStore(url)
    try:
        if args.command == "verify":
            return verify(store, out)
        if args.command == "export":
            rows = store.rows(since=iso_time(args.since), until=iso_time(args.until), user=args.user)
            return export(rows, args.format, out)
        days = args.days or settings.audit_retention_days
        if days is None or days < 1:
            raise CliError("prune needs --days N (N >= 1) or --audit-retention-days")
        deleted = store.prune((datetime.now(UTC) - timedelta(days=days)).isoformat(timespec="microseconds"))
        print(f"deleted {deleted} records older than {days} days", file=out)
        return 0
    finally:
        store.close()


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args, sys.stdout)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # an unreachable or foreign database: say which, in one line
        first_line = (str(exc).strip().splitlines() or [""])[0]
        print(f"error: the audit database failed: {type(exc).__name__}: {first_line}", file=sys.stderr)
        return 2
