"""The audit settings: off by default, --audit picks the data dir's SQLite file, a URL turns it on, and
--audit-required follows whether auditing is on unless set."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.settings import SettingsError, load_settings


def test_auditing_is_off_by_default_and_required_once_on(tmp_path: Path) -> None:
    off = load_settings(["--data-dir", str(tmp_path)])
    assert off.effective_audit_db() is None and not off.effective_audit_required()
    default = load_settings(["--data-dir", str(tmp_path), "--audit"])
    assert default.effective_audit_db() == f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    assert default.effective_audit_required()
    named = load_settings(["--audit-db", "postgresql://a@db/audit", "--no-audit-required"])
    assert named.effective_audit_db() == "postgresql://a@db/audit" and not named.effective_audit_required()


def test_a_bad_audit_url_names_the_flag() -> None:
    with pytest.raises(SettingsError, match=r"^--audit-db / QWEN3_LOCAL_AUDIT_DB: .*sqlite:///PATH"):
        load_settings(["--audit-db", "mysql://db/audit"])
