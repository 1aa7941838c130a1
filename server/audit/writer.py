"""The audit writer: routes enqueue finished records (never blocking); one background thread writes them in
batches. While the database is unreachable, batches go to an append-only spool file (one JSON record a line)
and are replayed in order, before anything newer, once it answers again. The spool is bounded: when it is full
`refusing()` turns true and, with --audit-required, the middleware answers new requests 503."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from server.audit.record import AuditRecord
from server.audit.store import AuditStore
from server.settings import Settings

log = logging.getLogger(__name__)

_STOP = object()


class AuditWriter:
    def __init__(
        self,
        store: AuditStore,
        spool_path: Path,
        *,
        spool_max_bytes: int,
        max_batch: int = 256,
        flush_interval_s: float = 0.05,
        retry_interval_s: float = 1.0,
        retention_days: int | None = None,
    ) -> None:
        self.store = store
        self.spool_path = spool_path
        self.spool_max_bytes = spool_max_bytes
        self.max_batch = max_batch
        self.flush_interval_s = flush_interval_s
        self.retry_interval_s = retry_interval_s
        self.retention_days = retention_days
        self._queue: queue.SimpleQueue[AuditRecord | object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._idle = threading.Event()  # set when everything enqueued so far has been handled
        self._idle.set()
        self._pending = 0
        self._lock = threading.Lock()
        self.db_available = True
        self.n_written = 0
        self._next_retention = 0.0
        self._next_retry = 0.0  # while spooling: the database is tried again from this time (monotonic) on
        spool_path.parent.mkdir(parents=True, exist_ok=True)

    # --- the request side ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def enqueue(self, record: AuditRecord) -> None:
        with self._lock:
            self._pending += 1
            self._idle.clear()
        self._queue.put(record)

    def spool_bytes(self) -> int:
        try:
            return self.spool_path.stat().st_size
        except FileNotFoundError:
            return 0

    def refusing(self) -> bool:
        """Whether the spool is full: a new record might not be kept."""
        return self.spool_bytes() >= self.spool_max_bytes

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every record enqueued so far is stored or spooled (tests, shutdown)."""
        return self._idle.wait(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Write what is queued (to the database, else the spool), then end the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout_s)
        self.store.close()

    # --- the writer thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch, stop = self._next_batch()
            if batch:
                self._write(batch)
                with self._lock:
                    self._pending -= len(batch)
                    if self._pending == 0:
                        self._idle.set()
            elif self.spool_bytes():
                self._write([])  # nothing new: retry the spool
            self._apply_retention()
            if stop:
                return

    def _next_batch(self) -> tuple[list[AuditRecord], bool]:
        """Up to max_batch records, gathered for up to a flush interval after the first."""
        # Wake up to retry the spool, and now and then to apply retention even when no request comes.
        timeout = self.retry_interval_s if self.spool_bytes() else (60.0 if self.retention_days else None)
        batch: list[AuditRecord] = []
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return batch, False
        deadline = time.monotonic() + self.flush_interval_s
        while True:
            if item is _STOP:
                return batch, True
            assert isinstance(item, AuditRecord)
            batch.append(item)
            if len(batch) >= self.max_batch:
                return batch, False
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return batch, False

    def _write(self, batch: list[AuditRecord]) -> None:
        """Spooled records first, then the batch; whatever the database does not take is spooled, in order."""
        if self.spool_bytes():
            self._spool(batch)  # behind what waits there: the order stays the order of arrival
            if time.monotonic() >= self._next_retry:
                self._replay_spool()
            return
        try:
            self.n_written += self.store.append(batch)
            self._available(True)
        except Exception as exc:
            self._available(False, exc)
            self._spool(batch)

    def _spool(self, batch: list[AuditRecord]) -> None:
        if not batch:
            return
        data = "".join(record.to_json() + "\n" for record in batch).encode("utf-8")
        # O_APPEND: a crash mid-write leaves at most a torn last line, which replay skips with a warning
        fd = os.open(self.spool_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _replay_spool(self) -> bool:
        """Store the spool's records in order, a batch at a time; True once the spool is empty."""
        try:
            self.store.ping()  # before reading a spool of up to --audit-spool-mib for nothing
        except Exception as exc:
            self._available(False, exc)
            return False
        lines = self.spool_path.read_bytes().decode("utf-8").splitlines()
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(AuditRecord.from_json(line))
            except ValueError:
                log.warning("audit spool line %d is torn (a crash while spooling); skipped", number)
        done = 0
        try:
            while done < len(records):
                chunk = records[done : done + self.max_batch]
                self.n_written += self.store.append(chunk)
                done += len(chunk)
        except Exception as exc:
            self._available(False, exc)
            if done:
                self._rewrite_spool(records[done:])
            return False
        self.spool_path.unlink()
        self._available(True)
        log.info("audit database reachable again: %d spooled records replayed", len(records))
        return True

    def _rewrite_spool(self, remaining: list[AuditRecord]) -> None:
        """Keep only what is not stored yet (atomically: a crash leaves the old spool, whose stored records
        replay skips)."""
        temporary = self.spool_path.with_suffix(".tmp")
        temporary.write_text("".join(record.to_json() + "\n" for record in remaining), encoding="utf-8")
        os.replace(temporary, self.spool_path)

    def _available(self, available: bool, exc: Exception | None = None) -> None:
        if not available:
            self._next_retry = time.monotonic() + self.retry_interval_s
        if available != self.db_available:
            if available:
                log.info("audit database reachable")
            else:
                log.warning("audit database unreachable, spooling to %s: %s", self.spool_path, exc)
        self.db_available = available

    def _apply_retention(self) -> None:
        if self.retention_days is None or time.monotonic() < self._next_retention or not self.db_available:
            return
        self._next_retention = time.monotonic() + 3600.0
        before = (datetime.now(UTC) - timedelta(days=self.retention_days)).isoformat()
        try:
            deleted = self.store.prune(before)
        except Exception:
            log.warning("audit retention failed; will retry", exc_info=True)
            return
        if deleted:
            log.info("audit retention: %d records older than %d days deleted", deleted, self.retention_days)


def writer_for(settings: Settings) -> AuditWriter | None:
    """The settings' audit writer (not started), or None when auditing is off."""
    url = settings.effective_audit_db()
    if url is None:
        return None
    return AuditWriter(
        AuditStore(url),
        settings.data_dir / "audit-spool.jsonl",
        spool_max_bytes=settings.audit_spool_mib * 1024 * 1024,
        retention_days=settings.audit_retention_days,
    )
