"""The key store: a JSON file of named API keys, each kept only as the SHA-256 of the key.

A key is shown once, when it is made; the file holds name, hash, scopes, limits, created and revoked times.
Verification compares the presented key's hash with every stored hash (revoked ones too) with
hmac.compare_digest and no early exit, so the time taken does not say which keys exist.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from server.auth.principal import AuthConfigError, Limits, Principal

KEY_PREFIX = "sk-q3l-"
BUILTIN_KEY_NAME = "api-key"  # the name --api-key's key runs under (in the audit log)


class KeyStoreError(AuthConfigError):
    """The key file is unreadable or a key operation is impossible; the message says why in one line."""


@dataclass(frozen=True)
class KeyRecord:
    name: str
    sha256: str  # hex digest of the key
    scopes: tuple[str, ...]
    created: float
    revoked: float | None = None
    rpm: int | None = None
    tpm: int | None = None

    def principal(self, defaults: Limits) -> Principal:
        """The caller this key authenticates: its own limits, else the server's defaults."""
        return Principal(self.name, frozenset(self.scopes), "key", Limits(self.rpm, self.tpm).over(defaults))


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _record(raw: Any) -> KeyRecord:
    try:
        return KeyRecord(
            name=str(raw["name"]),
            sha256=str(raw["sha256"]),
            scopes=tuple(str(s) for s in raw["scopes"]),
            created=float(raw["created"]),
            revoked=None if raw.get("revoked") is None else float(raw["revoked"]),
            rpm=None if raw.get("rpm") is None else int(raw["rpm"]),
            tpm=None if raw.get("tpm") is None else int(raw["tpm"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise KeyStoreError(f"a key entry is malformed ({type(exc).__name__}: {exc})") from exc


def load_keys(path: Path) -> tuple[KeyRecord, ...]:
    """Every record in the file (revoked ones included); none when the file does not exist."""
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return ()
    except (OSError, ValueError) as exc:
        raise KeyStoreError(f"cannot read the key file {path}: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise KeyStoreError(f"the key file {path} is not a {{'keys': [...]}} document")
    return tuple(_record(raw) for raw in document["keys"])


def save_keys(path: Path, records: tuple[KeyRecord, ...]) -> None:
    """Write atomically (a reloading server never reads half a file), readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump({"keys": [asdict(record) for record in records]}, file, indent=2)
        file.write("\n")
    os.replace(temporary, path)


def add_key(path: Path, name: str, scopes: tuple[str, ...], limits: Limits) -> str:
    """Store a new key under `name` and return it: the only time it exists outside the caller's hands."""
    if name == BUILTIN_KEY_NAME or not name.strip():
        raise KeyStoreError(f"{name!r} cannot name a key ('{BUILTIN_KEY_NAME}' is --api-key's)")
    records = load_keys(path)
    if any(record.name == name for record in records):
        raise KeyStoreError(f"a key named {name!r} already exists (revoked keys keep their name)")
    key = new_key()
    record = KeyRecord(name, key_digest(key), scopes, time.time(), None, limits.rpm, limits.tpm)
    save_keys(path, (*records, record))
    return key


def revoke_key(path: Path, name: str) -> None:
    records = load_keys(path)
    if not any(record.name == name and record.revoked is None for record in records):
        raise KeyStoreError(f"no active key named {name!r}")
    now = time.time()
    save_keys(path, tuple(replace(r, revoked=now) if r.name == name else r for r in records))


def match_key(records: tuple[KeyRecord, ...], presented: str) -> KeyRecord | None:
    """The active record whose hash is the presented key's, compared against every record without stopping
    at a match; None when none matches or the match is revoked."""
    digest = key_digest(presented).encode()
    found: KeyRecord | None = None
    for record in records:
        if hmac.compare_digest(digest, record.sha256.encode()):
            found = record
    return found if found is not None and found.revoked is None else None
