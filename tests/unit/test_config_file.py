"""--config FILE with profiles: precedence defaults < file < profile < environment < flags, both formats, and
one readable line for every mistake in the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.__main__ import main
from server.settings import SettingsError, load_settings, profile_error

TOML = """
max_queue = 7
port = 9000

[profiles.dev]
log-level = "debug"

[profiles.prod]
port = 8443
host = "10.0.0.5"
"""


@pytest.fixture
def toml_file(tmp_path: Path) -> Path:
    path = tmp_path / "qwen3-local.toml"
    path.write_text(TOML)
    return path


def test_top_level_then_profile_then_environment_then_flags(toml_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dev = load_settings(["--config", str(toml_file)])
    assert (dev.profile, dev.max_queue, dev.port, dev.log_level) == ("dev", 7, 9000, "debug")
    prod = load_settings(["--config", str(toml_file), "--profile", "prod"])
    assert (prod.max_queue, prod.port, prod.host, prod.log_level) == (7, 8443, "10.0.0.5", "info")
    monkeypatch.setenv("QWEN3_LOCAL_PORT", "9100")
    assert load_settings(["--config", str(toml_file), "--profile", "prod"]).port == 9100
    assert load_settings(["--config", str(toml_file), "--profile", "prod", "--port", "1234"]).port == 1234


def test_file_and_profile_may_come_from_the_environment(toml_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWEN3_LOCAL_CONFIG", str(toml_file))
    monkeypatch.setenv("QWEN3_LOCAL_PROFILE", "prod")
    assert load_settings([]).port == 8443


def test_yaml_reads_like_toml(tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text("max-queue: 3\nprofiles:\n  prod:\n    max_queue: 5\n")
    assert load_settings(["--config", str(path)]).max_queue == 3
    assert load_settings(["--config", str(path), "--profile", "prod"]).max_queue == 5


@pytest.mark.parametrize(
    ("name", "text", "argv", "words"),
    [
        ("a.toml", "max_queue = 7\n", ["--profile", "prod"], None),  # a standard profile without a table: the base
        ("a.toml", TOML, ["--profile", "staging"], "has no profile 'staging' (choose one of: dev, prod)"),
        ("a.toml", "max_queue = 7\n", ["--profile", "prdo"], "has no profile 'prdo' (choose one of: dev, prod)"),
        ("a.toml", "max_qeue = 7\n", [], "unknown setting(s) max_qeue"),
        ("a.toml", "[profiles.prod]\nprot = 1\n", ["--profile", "prod"], "[profiles.prod]: unknown setting(s) prot"),
        ("a.toml", 'max_queue = "many"\n', [], "--max-queue / QWEN3_LOCAL_MAX_QUEUE"),
        ("a.toml", "max_queue = \n", [], "does not parse"),
        ("a.toml", 'profile = "prod"\n', [], "profile cannot be set inside the file"),
        ("a.yaml", "- 1\n- 2\n", [], "must hold a mapping of settings"),
        ("a.json", "{}", [], "use a .toml, .yaml or .yml file"),
    ],
)
def test_mistakes_in_the_file_are_one_line_errors(
    tmp_path: Path, name: str, text: str, argv: list[str], words: str | None
) -> None:
    path = tmp_path / name
    path.write_text(text)
    if words is None:
        assert load_settings(["--config", str(path), *argv]).max_queue == 7
        return
    with pytest.raises(SettingsError) as caught:
        load_settings(["--config", str(path), *argv])
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_a_missing_file_stops_the_cli_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "nope.toml")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: cannot read config file") and error.count("\n") == 1


def test_prod_refuses_to_start_without_auth_and_audit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data-dir", str(tmp_path)]  # no keys file there: no named keys
    assert main([*data, "--profile", "prod"]) == 2
    error = capsys.readouterr().err
    assert "prod profile refuses to start without authentication" in error and "and an audit log" in error
    assert main([*data, "--profile", "prod", "--api-key", "sk-x"]) == 2
    error = capsys.readouterr().err
    assert "without an audit log" in error and "authentication" not in error
    assert main([*data, "--profile", "prod", "--audit"]) == 2
    assert "without authentication (" in capsys.readouterr().err
    assert profile_error(load_settings([*data, "--profile", "prod", "--api-key", "sk-x", "--audit"])) is None
    assert profile_error(load_settings([*data, "--profile", "dev"])) is None
