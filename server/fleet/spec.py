"""What one served model is: its id and aliases, the model to load, its own settings, and how long it stays.

The list comes from (first that is given): the --model flags (or QWEN3_LOCAL_MODEL), the settings' `serve:` list
(a --config file), models.yaml's `serve:` list, else models.yaml's default model. One model is the server as it
always was: its id is --served-model-name, else the models.yaml name or the file's stem."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.models import RegistryError, ServeEntry, load_registry
from server.fleet.keep_alive import DEFAULT_ON_DEMAND_S, KeepAliveError, parse_keep_alive
from server.settings import Settings, physical_cores

PRELOAD_ALL = "all"


class FleetConfigError(ValueError):
    """The served models contradict each other (a duplicate id, an unknown --preload); one line says which."""


@dataclass(frozen=True)
class ModelSpec:
    id: str
    settings: Settings  # the server's settings with this model's own over them (settings.model = [its model])
    aliases: tuple[str, ...] = ()
    preload: bool = False
    keep_alive_s: float | None = None  # idle seconds before unloading; None: never
    priority: int = 0
    sampling_defaults: Mapping[str, float] = field(default_factory=dict)
    # Its threads are a share of the cores split with the other served models (no --threads of its own): the
    # share follows which engines have work (server/engine/core_share.py).
    shares_cores: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        """Its id, then its aliases (an alias repeating the id counts once)."""
        return tuple(dict.fromkeys((self.id, *self.aliases)))


def _is_path(model: str) -> bool:
    return model.endswith(".gguf") or Path(model).expanduser().is_file()


def default_id(model: str) -> str:
    """The id of a model given by name (its name) or path (the file's stem)."""
    return Path(model).expanduser().stem if _is_path(model) else model


def sampling_defaults_for(settings: Settings, model: str) -> dict[str, float]:
    """The model's models.yaml sampling; none for a GGUF path or a name the registry cannot read (the load then
    reports that error itself)."""
    if _is_path(model):
        return {}
    try:
        return dict(load_registry(settings.models_file).entry(model).sampling.given())
    except RegistryError:
        return {}


def _entries(settings: Settings) -> list[ServeEntry]:
    if settings.model:
        entries = [ServeEntry(model=name) for name in settings.model]
        if settings.served_model_name:  # --served-model-name names the first (the default) model
            entries[0] = ServeEntry(model=entries[0].model, id=settings.served_model_name)
        return entries
    if settings.serve:
        return list(settings.serve)
    try:
        registry = load_registry(settings.models_file)
    except RegistryError:  # the load reports it (503, /health); the app still comes up to say so
        return [ServeEntry(model=settings.served_model_name or "default", id=settings.served_model_name)]
    if registry.serve:
        return list(registry.serve)
    return [ServeEntry(model=registry.default, id=settings.served_model_name)]


def _threads(settings: Settings, n_models: int) -> int:
    """Each engine's share of the physical cores to start with, so that engines never oversubscribe them (2
    models on 2 cores: 1 thread each; while one has no work the other takes both: core_share.py); --threads (or
    an entry's own) wins."""
    return max(1, physical_cores() // max(1, n_models))


def _keep_alive(entry: ServeEntry, settings: Settings, preload: bool) -> float | None:
    value = entry.keep_alive if entry.keep_alive is not None else settings.keep_alive
    if value is None:
        return None if preload else DEFAULT_ON_DEMAND_S
    try:
        return parse_keep_alive(value)
    except KeepAliveError as exc:
        raise FleetConfigError(f"model {entry.id or entry.model}: {exc}") from None


def model_specs(settings: Settings) -> list[ModelSpec]:
    """Every served model, the default first; FleetConfigError when two share a name or --preload names none."""
    entries = _entries(settings)
    ids = [entry.id or default_id(entry.model) for entry in entries]
    preload = set(settings.preload or [ids[0]])
    specs = []
    for index, (entry, model_id) in enumerate(zip(entries, ids, strict=True)):
        overrides: dict[str, Any] = {"model": [entry.model], "served_model_name": model_id}
        own = entry.setting_overrides()
        split_cores = len(entries) > 1 and settings.threads is None
        if split_cores:
            overrides["threads"] = _threads(settings, len(entries))
        overrides.update(own)
        loads_at_start = (
            entry.preload
            if entry.preload is not None
            else (PRELOAD_ALL in preload or model_id in preload or bool(preload & set(entry.aliases)))
        )
        if index == 0 and settings.preload is None and entry.preload is None:
            loads_at_start = True
        specs.append(
            ModelSpec(
                id=model_id,
                settings=settings.model_copy(update=overrides),
                aliases=tuple(entry.aliases),
                preload=loads_at_start,
                keep_alive_s=_keep_alive(entry, settings, loads_at_start),
                priority=entry.priority,
                sampling_defaults=sampling_defaults_for(settings, entry.model),
                shares_cores=split_cores and own.get("threads") is None,
            )
        )
    _check(specs, settings)
    return specs


def _check(specs: Sequence[ModelSpec], settings: Settings) -> None:
    seen: dict[str, str] = {}
    for spec in specs:
        for name in spec.names:
            if name in seen:
                raise FleetConfigError(f"two served models answer to {name!r} ({seen[name]} and {spec.id})")
            seen[name] = spec.id
    unknown = sorted(set(settings.preload or []) - set(seen) - {PRELOAD_ALL})
    if unknown:
        raise FleetConfigError(f"--preload names no served model: {', '.join(unknown)} (served: {', '.join(seen)})")
