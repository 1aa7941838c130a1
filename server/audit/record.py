"""One audit record, its canonical serialization and the hash chain that links records.

A record's hash is SHA-256 over the canonical JSON (sorted keys, no spaces, UTF-8) of every column but the hash
itself, the previous record's hash included: editing, inserting or deleting a row breaks the link to the next.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

ContentMode = Literal["full", "hashes", "none"]

GENESIS_HASH = "0" * 64  # what the first record of a log points back to


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def kept_content(text: str | None, mode: ContentMode) -> str | None:
    """A prompt or output as --audit-content keeps it: the text, its SHA-256 ("sha256:<hex>"), or nothing."""
    if text is None or mode == "none":
        return None
    return text if mode == "full" else "sha256:" + sha256_hex(text)


@dataclass
class AuditRecord:
    """What one request did. Filled in by the middleware and the route while the request runs, then handed to
    the writer, which adds seq, prev_hash and hash when it stores the record."""

    request_id: str
    time: str  # ISO 8601 UTC, microseconds: when the request arrived
    method: str
    endpoint: str
    client: str | None = None
    principal: str | None = None  # the API key's name or the JWT subject
    user: str | None = None  # the OpenAI `user` field
    model: str | None = None
    params: dict[str, Any] | None = None  # sampling parameters as the engine used them
    prompt: str | None = None
    output: str | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    generated_tokens: int | None = None
    ttft_ms: float | None = None
    latency_ms: float | None = None
    finish_reason: str | None = None
    status: int | None = None
    error_code: str | None = None
    # set by the writer
    seq: int | None = None
    prev_hash: str | None = None
    hash: str | None = None
    # not stored: how much content to keep, and per-choice output parts while a generation runs
    _content: ContentMode = field(default="full", repr=False, compare=False)
    _parts: dict[int, list[str]] = field(default_factory=dict, repr=False, compare=False)

    def keep_prompt(self, text: str) -> None:
        self.prompt = kept_content(text, self._content)

    @property
    def wants_output(self) -> bool:
        return self._content != "none"

    def add_output(self, index: int, text: str) -> None:
        self._parts.setdefault(index, []).append(text)

    def keep_output(self) -> None:
        """The generated text of every choice, in choice order (choices joined by a blank line when n > 1)."""
        if self._parts:
            text = "\n\n".join("".join(self._parts[index]) for index in sorted(self._parts))
            self.output = kept_content(text, self._content)

    def row(self) -> dict[str, Any]:
        """The stored columns (params as canonical JSON text)."""
        values = {name: getattr(self, name) for name in stored_fields()}
        values["params"] = canonical_json(self.params) if self.params is not None else None
        return values

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> AuditRecord:
        values = dict(row)
        values["params"] = json.loads(values["params"]) if values.get("params") is not None else None
        return cls(**values)

    def to_json(self) -> str:
        """One spool line."""
        return canonical_json(self.row())

    @classmethod
    def from_json(cls, line: str) -> AuditRecord:
        return cls.from_row(json.loads(line))


def stored_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(AuditRecord) if not f.name.startswith("_")]


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def record_hash(row: dict[str, Any]) -> str:
    """The hash of a stored row: over every column but `hash`, prev_hash and seq included."""
    linked = {name: value for name, value in row.items() if name != "hash"}
    return sha256_hex(canonical_json(linked))


def chain(record: AuditRecord, seq: int, prev_hash: str) -> dict[str, Any]:
    """The row to store for `record` as number `seq` after a record whose hash is prev_hash."""
    record.seq, record.prev_hash, record.hash = seq, prev_hash, None
    row = record.row()
    row["hash"] = record.hash = record_hash(row)
    return row
