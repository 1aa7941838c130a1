"""bench.ops_overhead's parts that run without a model: the rotation, the key it makes with the server's own
CLI, the servers it would start, and the audit count it checks the run against."""

from __future__ import annotations

import argparse
import sqlite3
from pathlib import Path

from bench.ops_overhead import VARIANTS, audit_record_count, make_key, round_order, variant


def test_each_variant_goes_first_once_in_as_many_rounds() -> None:
    firsts = [round_order(VARIANTS, index)[0] for index in range(len(VARIANTS))]
    assert sorted(firsts) == sorted(VARIANTS)
    assert all(sorted(round_order(VARIANTS, index)) == sorted(VARIANTS) for index in range(7))


def test_the_bench_key_is_a_real_key_of_the_key_file(tmp_path: Path) -> None:
    from server.auth.keys import load_keys, match_key

    keys_file = tmp_path / "keys.json"
    key = make_key(keys_file)
    record = match_key(load_keys(keys_file), key)
    assert record is not None and record.name == "bench"
    assert key not in keys_file.read_text()  # only its hash is stored


def test_the_variants_differ_only_in_auth_and_audit(tmp_path: Path) -> None:
    args = argparse.Namespace(model="smollm2-135m-instruct", parallel=16, threads=2, ctx_per_slot=512)
    made = {name: variant(name, tmp_path, args, "postgresql://postgres@127.0.0.1:1/postgres") for name in VARIANTS}
    assert made["off"].api_key is None and made["off"].audit_db is None
    assert "--audit-db" not in made["off"].spec.command
    assert made["sqlite"].audit_db == f"sqlite:///{tmp_path / 'sqlite' / 'audit.sqlite3'}"
    assert made["postgresql"].audit_db is not None and made["postgresql"].audit_db.startswith("postgresql://")
    for name in ("sqlite", "postgresql"):
        assert made[name].api_key and (tmp_path / name / "keys.json").is_file()
        command = made[name].spec.command
        assert command[command.index("--audit-db") + 1] == made[name].audit_db


def test_audit_records_are_counted_in_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite3"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE audit_log (seq INTEGER PRIMARY KEY)")
        connection.executemany("INSERT INTO audit_log VALUES (?)", [(1,), (2,), (3,)])
    assert audit_record_count(f"sqlite:///{path}") == 3
