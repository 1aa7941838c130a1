"""A throwaway PostgreSQL server from Debian's `postgresql` package, for the audit tests and benchmarks.

pytest-postgresql's executor runs initdb and pg_ctl in a directory of its own. PostgreSQL refuses to run as
root, and CI runs as root: there pg_ctl runs as the `postgres` system user (which Debian's package creates)
through a two-line wrapper, in a directory that user can enter.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg
from pytest_postgresql.executors import PostgreSQLExecutor


def postgres_bin() -> Path:
    """Debian's newest installed PostgreSQL (/usr/lib/postgresql/<major>/bin), or $QWEN3_LOCAL_TEST_PG_BIN."""
    if "QWEN3_LOCAL_TEST_PG_BIN" in os.environ:
        return Path(os.environ["QWEN3_LOCAL_TEST_PG_BIN"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda path: int(path.parts[-3]))
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pg_ctl(base: Path) -> str:
    """pg_ctl itself, or as root a wrapper that runs it as `postgres` (with the directory handed over)."""
    pg_ctl = postgres_bin() / "pg_ctl"
    if not pg_ctl.is_file():
        raise FileNotFoundError(f"{pg_ctl} is missing: install Debian's postgresql package (.ci/run does)")
    if os.geteuid() != 0:
        return str(pg_ctl)
    shutil.chown(base, "postgres", "postgres")
    wrapper = base / "pg_ctl_as_postgres"
    wrapper.write_text(f'#!/bin/sh\nexec runuser -u postgres -- "{pg_ctl}" "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


class ThrowawayPostgres:
    """One PostgreSQL server in a temporary directory of its own, user `postgres` without a password on
    127.0.0.1; stop() and start() it again to simulate an outage, close() to remove it."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="qwen3-local-pg-"))
        self.base.chmod(0o755)
        self.port = free_port()
        self._database_names = itertools.count()
        self.executor = PostgreSQLExecutor(
            executable=_pg_ctl(self.base),
            host="127.0.0.1",
            port=self.port,
            datadir=str(self.base / "data"),
            unixsocketdir=str(self.base),
            logfile=str(self.base / "postgresql.log"),
            startparams="-w",
            dbname="postgres",
            user="postgres",
        )

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database on this server; its postgresql:// URL."""
        name = f"db_{os.getpid()}_{next(self._database_names)}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def start(self) -> None:
        self.executor.start()

    def stop(self) -> None:
        self.executor.stop()

    def kill(self) -> None:
        """Stop it the way a crash or `kill -9` does: `pg_ctl stop -m immediate` ends every server process
        without a clean shutdown (the next start runs crash recovery). start() works again afterwards."""
        subprocess.run(
            [self.executor.executable, "stop", "-D", self.executor.datadir, "-m", "immediate"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        super(PostgreSQLExecutor, self.executor).stop()  # forget pg_ctl's process, so start() starts anew

    def close(self) -> None:
        if self.executor.running():
            self.executor.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> ThrowawayPostgres:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
