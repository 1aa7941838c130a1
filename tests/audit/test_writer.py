"""The writer on its own: a spool left by an earlier run (a torn last write included) is replayed first, in
order, before anything newer; stopping with the database down keeps what is queued in the spool."""

from __future__ import annotations

from pathlib import Path

from server.audit.record import AuditRecord
from server.audit.store import AuditStore
from server.audit.writer import AuditWriter


def _record(request_id: str) -> AuditRecord:
    return AuditRecord(request_id=request_id, time="2026-11-30T00:00:00.000000+00:00", method="POST", endpoint="/x")


def test_a_left_over_spool_replays_first_and_skips_a_torn_line(tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    spool.write_text(_record("a").to_json() + "\n" + '{"request_id": "torn', encoding="utf-8")
    spool.write_text(spool.read_text() + "\n" + _record("b").to_json() + "\n")
    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    writer = AuditWriter(AuditStore(url), spool, spool_max_bytes=1 << 20, retry_interval_s=0.05)
    writer.start()
    writer.enqueue(_record("c"))
    assert writer.flush()
    writer.stop()
    assert not spool.exists()
    store = AuditStore(url)
    assert [row["request_id"] for row in store.rows()] == ["a", "b", "c"]
    assert store.verify() == (3, None)


def test_stopping_while_the_database_is_down_spools_what_is_queued(tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    writer = AuditWriter(AuditStore("postgresql://nobody@127.0.0.1:1/none"), spool, spool_max_bytes=300)
    writer.start()
    for request_id in ("a", "b", "c"):
        writer.enqueue(_record(request_id))
    writer.stop()
    assert [AuditRecord.from_json(line).request_id for line in spool.read_text().splitlines()] == ["a", "b", "c"]
    assert writer.refusing()  # over its 300 bytes: the middleware would answer 503 now
