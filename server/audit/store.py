"""The audit database, SQLite or PostgreSQL (psycopg 3) through SQLAlchemy Core; its schema is made by the
Alembic migrations shipped in server/audit/migrations, applied on open."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from server.audit.record import GENESIS_HASH, AuditRecord, chain, record_hash

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"

metadata = sa.MetaData()
audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("request_id", sa.String(64), nullable=False, unique=True),
    sa.Column("time", sa.String(32), nullable=False, index=True),
    sa.Column("method", sa.String(16), nullable=False),
    sa.Column("endpoint", sa.Text, nullable=False),
    sa.Column("client", sa.Text),
    sa.Column("principal", sa.Text),
    sa.Column("user", sa.Text),
    sa.Column("model", sa.Text),
    sa.Column("params", sa.Text),
    sa.Column("prompt", sa.Text),
    sa.Column("output", sa.Text),
    sa.Column("prompt_tokens", sa.Integer),
    sa.Column("cached_tokens", sa.Integer),
    sa.Column("generated_tokens", sa.Integer),
    sa.Column("ttft_ms", sa.Float),
    sa.Column("latency_ms", sa.Float),
    sa.Column("finish_reason", sa.String(32)),
    sa.Column("status", sa.Integer),
    sa.Column("error_code", sa.String(64)),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)
# Where the chain starts once retention has deleted its head: the last deleted record's seq and hash.
audit_anchor = sa.Table(
    "audit_anchor",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)

COLUMNS = [column.name for column in audit_log.columns]


def engine_url(url: str) -> str:
    """postgresql://… means psycopg 3 here (SQLAlchemy would pick psycopg2)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def create_db_engine(url: str, connect_timeout_s: float = 3.0) -> sa.Engine:
    url = engine_url(url)
    if url.startswith("sqlite"):
        path = sa.make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        return sa.create_engine(url, connect_args={"timeout": connect_timeout_s})
    return sa.create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": max(1, int(connect_timeout_s))})


def migrate(engine: sa.Engine) -> None:
    """Bring the schema to the newest migration (a no-op when it is there already)."""
    from alembic import command  # deferred: only the writer thread and the CLI need it
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


@dataclass(frozen=True)
class BrokenLink:
    seq: int
    request_id: str
    reason: str


class AuditStore:
    def __init__(self, url: str, connect_timeout_s: float = 3.0) -> None:
        self.url = url
        self.engine = create_db_engine(url, connect_timeout_s)
        self._migrated = False

    def close(self) -> None:
        self.engine.dispose()

    def ensure_schema(self) -> None:
        if not self._migrated:
            migrate(self.engine)
            self._migrated = True

    def ping(self) -> None:
        """Raise unless the database answers."""
        with self.engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))

    def append(self, records: Sequence[AuditRecord]) -> int:
        """Chain and insert records in one transaction, skipping any already stored (a replay after a commit
        whose answer was lost); returns how many were inserted. Raises when the database is unreachable."""
        self.ensure_schema()
        with self.engine.begin() as connection:
            ids = [record.request_id for record in records]
            stored = set(
                connection.scalars(sa.select(audit_log.c.request_id).where(audit_log.c.request_id.in_(ids))).all()
            )
            seq, prev = self._head(connection)
            rows = []
            for record in records:
                if record.request_id in stored:
                    continue
                stored.add(record.request_id)
                seq += 1
                rows.append(chain(record, seq, prev))
                prev = rows[-1]["hash"]
            if rows:
                connection.execute(audit_log.insert(), rows)
        return len(rows)

    def _head(self, connection: sa.Connection) -> tuple[int, str]:
        last = connection.execute(
            sa.select(audit_log.c.seq, audit_log.c.hash).order_by(audit_log.c.seq.desc()).limit(1)
        ).first()
        if last is not None:
            return int(last.seq), str(last.hash)
        anchor = connection.execute(sa.select(audit_anchor.c.seq, audit_anchor.c.hash)).first()
        return (int(anchor.seq), str(anchor.hash)) if anchor is not None else (0, GENESIS_HASH)

    def rows(
        self,
        *,
        since: str | None = None,
        until: str | None = None,
        user: str | None = None,
        batch: int = 1000,
    ) -> Iterator[dict[str, Any]]:
        """Stored rows in chain order, filtered by time (ISO strings compare in time order) and user."""
        self.ensure_schema()
        query = sa.select(audit_log).order_by(audit_log.c.seq)
        if since is not None:
            query = query.where(audit_log.c.time >= since)
        if until is not None:
            query = query.where(audit_log.c.time < until)
        if user is not None:
            query = query.where(audit_log.c.user == user)
        with self.engine.connect() as connection:
            result = connection.execution_options(yield_per=batch).execute(query)
            for row in result:
                yield dict(row._mapping)

    def verify(self) -> tuple[int, BrokenLink | None]:
        """Walk the chain: (records checked, the first broken link or None)."""
        self.ensure_schema()
        with self.engine.connect() as connection:
            anchor = connection.execute(sa.select(audit_anchor.c.seq, audit_anchor.c.hash)).first()
        expected_seq, prev = (int(anchor.seq) + 1, str(anchor.hash)) if anchor is not None else (1, GENESIS_HASH)
        checked = 0
        for row in self.rows():
            reason = _link_problem(row, expected_seq, prev)
            if reason is not None:
                return checked, BrokenLink(int(row["seq"]), str(row["request_id"]), reason)
            checked += 1
            expected_seq, prev = int(row["seq"]) + 1, str(row["hash"])
        return checked, None

    def prune(self, before: str) -> int:
        """Delete records older than `before` (ISO time) from the start of the chain, keeping the last deleted
        record's seq and hash as the anchor the remaining chain starts from."""
        self.ensure_schema()
        with self.engine.begin() as connection:
            last = connection.execute(
                sa.select(audit_log.c.seq, audit_log.c.hash)
                .where(audit_log.c.time < before)
                .order_by(audit_log.c.seq.desc())
                .limit(1)
            ).first()
            if last is None:
                return 0
            deleted = connection.execute(audit_log.delete().where(audit_log.c.seq <= last.seq)).rowcount
            connection.execute(audit_anchor.delete())
            connection.execute(audit_anchor.insert(), {"id": 1, "seq": last.seq, "hash": last.hash})
        return int(deleted)


def _link_problem(row: dict[str, Any], expected_seq: int, prev: str) -> str | None:
    if int(row["seq"]) != expected_seq:
        return f"expected record {expected_seq} here, found {row['seq']} (records missing)"
    if row["prev_hash"] != prev:
        return "its prev_hash does not match the previous record's hash (a record before it was changed or removed)"
    if record_hash({name: row[name] for name in COLUMNS}) != row["hash"]:
        return "its contents do not match its hash (the record was changed)"
    return None
