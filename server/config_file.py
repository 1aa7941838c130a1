"""`--config FILE`: settings from a TOML or YAML file, with per-environment profiles.

    # qwen3-local.toml: top-level keys apply to every profile; [profiles.NAME] overrides them for one
    model = "qwen3-next-80b-a3b-instruct"
    auto_offload = true

    [profiles.dev]
    log_level = "debug"

    [profiles.prod]
    host = "0.0.0.0"
    audit_db = "postgresql://audit@db/qwen3"

A `serve` key lists several models to serve together, each with its id, aliases, keep_alive, preload, priority
and its own settings (registry.models.ServeEntry; README "Several models"):

    [[serve]]
    model = "qwen3-next-80b-a3b-instruct"
    id = "qwen"
    [[serve]]
    model = "/models/coder.gguf"
    aliases = ["coder"]
    keep_alive = "10m"

Keys are the settings' names (`python -m server --help` lists them; `max-queue` and `max_queue` both work).
Precedence, lowest first: defaults < the file's top level < its selected profile < environment variables
(QWEN3_LOCAL_*) < command-line flags, so a deployment's file can be overridden per host or per run.
The profile is `--profile` / QWEN3_LOCAL_PROFILE (default "dev"). The values go through the same Settings model
as flags and environment variables, so a bad value in the file is the same one-line error, naming the key.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

PROFILES_KEY = "profiles"
DEFAULT_PROFILE = "dev"
# Profiles the server itself knows (prod adds requirements, see settings.profile_error): valid without a table
# in the file. Any other name must be a table of the file, so a typo is an error, not the base settings.
STANDARD_PROFILES = frozenset({"dev", "prod"})


class ConfigFileError(ValueError):
    """The config file cannot be read, does not parse, or names a setting or profile that does not exist."""


def read_config_file(path: Path) -> dict[str, Any]:
    """The file's mapping: TOML for .toml, YAML for .yaml/.yml."""
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigFileError(f"config file {path}: use a .toml, .yaml or .yml file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"cannot read config file {path}: {exc}") from exc
    try:
        body = tomllib.loads(text) if suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigFileError(f"config file {path} does not parse: {exc}") from exc
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise ConfigFileError(f"config file {path} must hold a mapping of settings")
    return body


def _normalized(values: Mapping[str, Any], path: Path, known: Mapping[str, FieldInfo], where: str) -> dict[str, Any]:
    settings = {str(key).replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ConfigFileError(f"config file {path}{where}: unknown setting(s) {', '.join(unknown)}")
    reserved = sorted({"config", "profile"} & set(settings))
    if reserved:
        raise ConfigFileError(f"config file {path}{where}: {', '.join(reserved)} cannot be set inside the file")
    return settings


def profile_values(body: Mapping[str, Any], path: Path, profile: str, known: Mapping[str, FieldInfo]) -> dict[str, Any]:
    """The top-level settings with the selected profile's over them."""
    profiles = body.get(PROFILES_KEY, {})
    if not isinstance(profiles, dict) or not all(isinstance(table, dict) for table in profiles.values()):
        raise ConfigFileError(f"config file {path}: '{PROFILES_KEY}' must map profile names to tables of settings")
    if profile not in profiles and profile not in STANDARD_PROFILES:
        choices = ", ".join(sorted(set(profiles) | STANDARD_PROFILES))
        raise ConfigFileError(f"config file {path} has no profile {profile!r} (choose one of: {choices})")
    base = _normalized({k: v for k, v in body.items() if k != PROFILES_KEY}, path, known, "")
    chosen = _normalized(profiles.get(profile, {}), path, known, f" [profiles.{profile}]")
    return {**base, **chosen}


class ConfigFileSource(PydanticBaseSettingsSource):
    """The settings source between the environment and the defaults: reads the file named by the higher
    sources (flag or QWEN3_LOCAL_CONFIG) for the profile they select."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the whole file at once

    def __call__(self) -> dict[str, Any]:
        state = self.current_state
        path = state.get("config")
        if path is None:
            return {}
        profile = str(state.get("profile") or DEFAULT_PROFILE)
        path = Path(path)
        return profile_values(read_config_file(path), path, profile, self.settings_cls.model_fields)


def customise_sources(
    settings_cls: type[BaseSettings],
    init_settings: PydanticBaseSettingsSource,
    env_settings: PydanticBaseSettingsSource,
) -> tuple[PydanticBaseSettingsSource, ...]:
    """Flags (init) > environment > config file > defaults; no .env or secrets files."""
    return init_settings, env_settings, ConfigFileSource(settings_cls)
