"""The key store and `python -m server keys`: keys exist on disk only as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from server.auth import keys as keys_module
from server.auth.cli import main
from server.auth.keys import KeyStoreError, load_keys, match_key
from server.settings import Settings, exposure_error
from tests.auth.conftest import make_key


def run_cli(capsys: pytest.CaptureFixture[str], path: Path, *argv: str) -> tuple[int, str, str]:
    code = main(["--keys-file", str(path), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_add_prints_the_key_once_and_stores_only_its_hash(keys_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(
        capsys, keys_file, "add", "alice", "--scope", "inference", "--scope", "admin", "--rpm", "5"
    )
    assert code == 0, err
    [key] = out.splitlines()
    assert key.startswith("sk-q3l-") and len(key) > 40
    text = keys_file.read_text()
    assert key not in text and key.removeprefix("sk-q3l-") not in text
    [entry] = json.loads(text)["keys"]
    assert entry["sha256"] == hashlib.sha256(key.encode()).hexdigest()
    assert entry["scopes"] == ["inference", "admin"] and entry["rpm"] == 5 and entry["tpm"] is None
    assert entry["revoked"] is None and entry["created"] > 0
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600  # only the owner reads even the hashes


def test_list_shows_names_and_never_keys_or_hashes(keys_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = make_key(keys_file, "alice", "inference")
    make_key(keys_file, "ops", "admin", tpm=1000)
    code, out, _ = run_cli(capsys, keys_file, "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["NAME", "SCOPES", "RPM", "TPM"]
    assert lines[1].split()[:2] == ["alice", "inference"] and lines[1].rstrip().endswith("-")
    assert lines[2].split()[:4] == ["ops", "admin", "-", "1000"]
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert key not in out and digest not in out


def test_revoke_marks_the_key_and_it_stops_matching(keys_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = make_key(keys_file, "alice")
    assert match_key(load_keys(keys_file), key) is not None
    code, _, err = run_cli(capsys, keys_file, "revoke", "alice")
    assert code == 0 and "SIGHUP" in err
    [record] = load_keys(keys_file)
    assert record.revoked is not None
    assert match_key(load_keys(keys_file), key) is None
    code, out, _ = run_cli(capsys, keys_file, "list")
    assert "UTC" not in out and out.splitlines()[1].split()[-1].endswith("Z")  # the revocation time is listed


@pytest.mark.parametrize(
    ("setup", "argv", "message"),
    [
        (True, ["revoke", "nobody"], "no active key named 'nobody'"),
        (True, ["add", "alice"], "a key named 'alice' already exists"),
        (False, ["revoke", "alice"], "no active key named 'alice'"),
        (False, ["add", "api-key"], "is --api-key's"),
    ],
)
def test_bad_operations_fail_in_one_line(
    keys_file: Path, capsys: pytest.CaptureFixture[str], setup: bool, argv: list[str], message: str
) -> None:
    if setup:
        make_key(keys_file, "alice")
    code, out, err = run_cli(capsys, keys_file, *argv)
    assert code == 1 and out == ""
    [line] = err.splitlines()
    assert line.startswith("error: ") and message in line


def test_a_malformed_key_file_is_one_line_for_the_cli_and_stops_the_server(
    keys_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys_file.parent.mkdir(parents=True)
    keys_file.write_text('{"keys": [{"name": "x"}]}')
    code, _, err = run_cli(capsys, keys_file, "list")
    assert code == 1 and len(err.splitlines()) == 1 and "malformed" in err
    keys_file.write_text("not json")
    refusal = exposure_error(Settings(keys_file=keys_file))  # even on loopback: a broken key file never means open
    assert refusal is not None and str(keys_file) in refusal


def test_the_real_subcommand_uses_the_servers_data_dir(tmp_path: Path) -> None:
    env = {**os.environ, "QWEN3_LOCAL_DATA_DIR": str(tmp_path / "data")}
    env.pop("QWEN3_LOCAL_KEYS_FILE", None)
    added = subprocess.run(
        [sys.executable, "-m", "server", "keys", "add", "ci", "--tpm", "100"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    key = added.stdout.strip()
    [record] = load_keys(tmp_path / "data" / "keys.json")
    assert record.name == "ci" and record.tpm == 100 and match_key((record,), key) == record
    listed = subprocess.run(
        [sys.executable, "-m", "server", "keys", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "ci" in listed.stdout and key not in listed.stdout + listed.stderr


def test_verification_compares_against_every_key_without_stopping(
    keys_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No early exit: whether the key is the first, the last, revoked or unknown, every stored hash is compared."""
    first = make_key(keys_file, "first")
    make_key(keys_file, "middle")
    last = make_key(keys_file, "last")
    records = load_keys(keys_file)
    calls: list[int] = []
    compare = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return compare(a, b)

    monkeypatch.setattr(keys_module.hmac, "compare_digest", counting)
    for presented in (first, last, "sk-q3l-unknown", first[:-1] + ("A" if first[-1] != "A" else "B")):
        calls.clear()
        match_key(records, presented)
        assert len(calls) == len(records), presented


def test_a_missing_file_is_no_keys_and_a_bad_one_is_an_error(tmp_path: Path) -> None:
    assert load_keys(tmp_path / "absent.json") == ()
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(KeyStoreError, match="is not a"):
        load_keys(tmp_path / "list.json")
