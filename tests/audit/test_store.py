"""The hash chain, tamper detection, export and retention, on SQLite and a real PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from server.audit import cli
from server.audit.record import GENESIS_HASH, AuditRecord
from server.audit.store import AuditStore, audit_log


def _record(number: int, *, user: str | None = "alice", days_ago: float = 0.0) -> AuditRecord:
    moment = datetime.now(UTC) - timedelta(days=days_ago)
    return AuditRecord(
        request_id=f"req-{number}",
        time=moment.isoformat(timespec="microseconds"),
        method="POST",
        endpoint="/v1/chat/completions",
        user=user,
        model="m",
        params={"temperature": 0.7, "stop": ["\n"]},
        prompt=f"prompt {number} — é",
        output=f"output {number}",
        prompt_tokens=number,
        generated_tokens=2 * number,
        ttft_ms=12.345,
        latency_ms=0.1 + number,
        status=200,
    )


def _run_cli(url: str, *argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = cli.main(["--audit-db", url, *argv])
    return status, capsys.readouterr().out


def test_records_chain_in_order_and_verify(audit_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = AuditStore(audit_url)
    assert store.append([_record(1), _record(2)]) == 2
    assert store.append([_record(3), _record(2)]) == 1  # a replayed record is stored once
    rows = list(store.rows())
    assert [row["seq"] for row in rows] == [1, 2, 3]
    assert [row["request_id"] for row in rows] == ["req-1", "req-2", "req-3"]
    assert rows[0]["prev_hash"] == GENESIS_HASH
    assert [row["prev_hash"] for row in rows[1:]] == [row["hash"] for row in rows[:-1]]
    assert rows[0]["prompt"] == "prompt 1 — é" and json.loads(rows[0]["params"])["stop"] == ["\n"]
    assert store.verify() == (3, None)
    store.close()
    assert _run_cli(audit_url, "verify", capsys=capsys) == (0, "ok: 3 records, the hash chain is intact\n")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"output": "something else"}, "contents do not match its hash"),
        ({"generated_tokens": 999}, "contents do not match its hash"),
    ],
)
def test_verify_names_the_edited_record(
    audit_url: str, capsys: pytest.CaptureFixture[str], change: dict[str, object], reason: str
) -> None:
    store = AuditStore(audit_url)
    store.append([_record(number) for number in range(1, 6)])
    with store.engine.begin() as connection:
        connection.execute(audit_log.update().where(audit_log.c.seq == 3).values(**change))
    checked, broken = store.verify()
    assert checked == 2 and broken is not None
    assert (broken.seq, broken.request_id) == (3, "req-3") and reason in broken.reason
    store.close()
    status, out = _run_cli(audit_url, "verify", capsys=capsys)
    assert status == 1 and out.startswith("broken: record 3 (request req-3)")


def test_verify_names_the_link_after_a_recomputed_edit_or_a_deletion(audit_url: str) -> None:
    store = AuditStore(audit_url)
    store.append([_record(number) for number in range(1, 6)])
    # A forger who recomputes the edited row's own hash still breaks the next row's link.
    rows = {row["seq"]: row for row in store.rows()}
    forged = AuditRecord.from_row({**rows[2], "output": "forged"})
    from server.audit.record import chain

    new_row = chain(forged, 2, rows[2]["prev_hash"])
    with store.engine.begin() as connection:
        connection.execute(audit_log.update().where(audit_log.c.seq == 2).values(**new_row))
    _, broken = store.verify()
    assert broken is not None and broken.seq == 3 and "prev_hash" in broken.reason
    with store.engine.begin() as connection:
        connection.execute(audit_log.delete().where(audit_log.c.seq <= 3))
    _, broken = store.verify()
    assert broken is not None and broken.seq == 4 and "missing" in broken.reason
    store.close()


def test_export_filters_by_time_and_user(audit_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = AuditStore(audit_url)
    store.append([_record(1, days_ago=3), _record(2, user="bob", days_ago=1), _record(3), _record(4, user="bob")])
    store.close()
    since = (datetime.now(UTC) - timedelta(days=2)).date().isoformat()
    status, out = _run_cli(audit_url, "export", "--since", since, "--user", "bob", capsys=capsys)
    assert status == 0
    assert [json.loads(line)["request_id"] for line in out.splitlines()] == ["req-2", "req-4"]
    until = (datetime.now(UTC) - timedelta(hours=12)).isoformat()
    status, out = _run_cli(audit_url, "export", "--until", until, "--format", "csv", capsys=capsys)
    table = list(csv.DictReader(io.StringIO(out)))
    assert [row["request_id"] for row in table] == ["req-1", "req-2"]
    assert table[0]["prompt"] == "prompt 1 — é" and table[0]["status"] == "200"


def test_a_bad_time_is_one_line(audit_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--audit-db", audit_url, "export", "--since", "yesterday"]) == 2
    assert capsys.readouterr().err == "error: not an ISO 8601 date or time: 'yesterday'\n"


def test_an_unreachable_database_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--audit-db", "postgresql://nobody@127.0.0.1:1/none", "verify"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the audit database failed: OperationalError") and err.count("\n") == 1


def test_retention_keeps_the_rest_of_the_chain_verifiable(audit_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = AuditStore(audit_url)
    store.append([_record(1, days_ago=40), _record(2, days_ago=35), _record(3, days_ago=1)])
    store.close()
    status, out = _run_cli(audit_url, "prune", "--days", "30", capsys=capsys)
    assert (status, out) == (0, "deleted 2 records older than 30 days\n")
    store = AuditStore(audit_url)
    assert [row["request_id"] for row in store.rows()] == ["req-3"]
    assert store.verify() == (1, None)
    store.append([_record(4)])  # the chain goes on from the survivors
    assert store.verify() == (2, None)
    with store.engine.begin() as connection:  # the anchor makes removing the oldest survivor visible too
        connection.execute(sa.delete(audit_log).where(audit_log.c.seq == 3))
    _, broken = store.verify()
    assert broken is not None and broken.seq == 4
    store.close()
