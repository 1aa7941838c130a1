"""models.yaml: the models qwen3-local knows by name, and how to find each one's GGUF on this machine."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from registry.hub_cache import find_cached_gguf


def _default_registry_path() -> Path:
    """QWEN3_LOCAL_MODELS_FILE if set (the server's settings read it too); else the models.yaml that the
    wheel carries inside this package; else the checkout's top-level models.yaml (an editable install)."""
    override = os.environ.get("QWEN3_LOCAL_MODELS_FILE")
    if override:
        return Path(override)
    packaged = Path(__file__).resolve().parent / "models.yaml"
    return packaged if packaged.is_file() else Path(__file__).resolve().parent.parent / "models.yaml"


DEFAULT_REGISTRY_PATH = _default_registry_path()

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_repo_id(repo: str) -> str:
    if not _REPO_ID.fullmatch(repo):
        raise ValueError(f"{repo!r} is not a hub repository id of the form 'owner/name'")
    return repo


class RegistryError(ValueError):
    """models.yaml is unreadable or a model name cannot be resolved to a file; the message says why."""


class PackageSource(BaseModel):
    """A GGUF shipped inside an installed Python package (found without importing it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    module: str = Field(description="Importable module name whose package directory holds the file.")
    file: str = Field(description="File name inside that package directory.")


class HubSource(BaseModel):
    """A GGUF published on the Hugging Face hub."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    repo: str = Field(description="Hub repository id, e.g. 'Qwen/Qwen3-Next-80B-A3B-Instruct-GGUF'.")
    default_quant: str = Field(description="Quantization used when none is asked for.")
    quants: dict[str, str] = Field(description="Quantization name → file glob (several shards may match).")
    revision: str = Field(default="main", description="Hub revision (branch, tag or commit).")
    sha256: dict[str, str] = Field(
        default_factory=dict,
        description="Repository file path → expected sha256 (64 lowercase hex digits); overrides the hub's.",
    )

    @field_validator("repo")
    @classmethod
    def _repo_is_repo_id(cls, repo: str) -> str:
        return _check_repo_id(repo)

    @field_validator("quants")
    @classmethod
    def _quants_are_gguf_globs(cls, quants: dict[str, str]) -> dict[str, str]:
        if not quants:
            raise ValueError("at least one quantization is needed")
        for quant, pattern in quants.items():
            if not pattern.endswith(".gguf"):
                raise ValueError(f"pattern {pattern!r} of {quant} must end in .gguf")
        return quants

    @field_validator("sha256")
    @classmethod
    def _sha256_are_hex(cls, digests: dict[str, str]) -> dict[str, str]:
        for file_name, digest in digests.items():
            if not _SHA256.fullmatch(digest):
                raise ValueError(f"sha256 of {file_name!r} must be 64 lowercase hex digits, got {digest!r}")
        return digests

    @model_validator(mode="after")
    def _default_quant_is_listed(self) -> HubSource:
        if self.default_quant not in self.quants:
            listed = ", ".join(sorted(self.quants))
            raise ValueError(f"default_quant {self.default_quant!r} is not one of quants ({listed})")
        return self


class SamplingDefaults(BaseModel):
    """A model's recommended sampling: what the server uses for each parameter a request leaves out. The
    ranges are the API's own (server/api/schemas.py), so a default is never one a request could not send."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(default=None, gt=0.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)

    @field_validator(
        "temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty", mode="before"
    )
    @classmethod
    def _int_is_a_float(cls, value: Any) -> Any:
        # YAML reads `min_p: 0` as an int; strict mode would refuse it, but a bool must stay refused
        return float(value) if type(value) is int else value

    def given(self) -> dict[str, float | int]:
        """Only the parameters models.yaml sets."""
        return {name: value for name, value in self.model_dump().items() if value is not None}


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    description: str = ""
    package: PackageSource | None = None
    hub: HubSource | None = None
    safetensors_repo: str | None = Field(default=None, description="Original checkpoint, for conversion.")
    context: int = Field(default=4096, gt=0, description="Default context length to serve with.")
    chat_template: str | None = Field(default=None, description="Jinja chat template overriding the GGUF's.")
    sampling: SamplingDefaults = Field(
        default_factory=SamplingDefaults, description="Recommended sampling, for parameters a request leaves out."
    )
    embedding: bool = Field(default=False, description="Serve POST /v1/embeddings with it (as --embeddings does).")

    @field_validator("safetensors_repo")
    @classmethod
    def _safetensors_repo_is_repo_id(cls, repo: str | None) -> str | None:
        return None if repo is None else _check_repo_id(repo)


class ServeEntry(BaseModel):
    """One model a server serves beside others (`serve:` in models.yaml or a --config file; server/fleet): what
    to load, the ids it answers to, and the settings it overrides for itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str = Field(description="A models.yaml name or a path to a .gguf.")
    id: str | None = Field(default=None, description="The id clients send as `model` (default: the name or stem).")
    aliases: list[str] = Field(default_factory=list, description="More ids it answers to.")
    keep_alive: str | int | float | None = Field(
        default=None, description="Idle time before it unloads (Ollama's: '5m', seconds, 0, -1 = never)."
    )
    preload: bool | None = Field(default=None, description="Load at start (default: only the first model).")
    priority: int = Field(default=0, description="Higher: kept loaded before lower ones when memory is short.")
    # per-model settings (server/settings.py's names and meanings)
    parallel: int | None = Field(default=None, ge=1, le=256)
    ctx_size: int | None = Field(default=None, ge=16)
    threads: int | None = Field(default=None, ge=1)
    threads_batch: int | None = Field(default=None, ge=1)
    max_queue: int | None = Field(default=None, ge=0)
    max_batch_tokens: int | None = Field(default=None, ge=1)
    mmap: bool | None = None
    mlock: bool | None = None
    n_gpu_layers: int | None = None
    embeddings: bool | None = None
    auto_offload: bool | None = None
    chat_template: str | None = None
    prompt_cache_mib: int | None = Field(default=None, ge=0)

    FLEET_FIELDS: ClassVar[frozenset[str]] = frozenset({"model", "id", "aliases", "keep_alive", "preload", "priority"})

    def setting_overrides(self) -> dict[str, Any]:
        """The settings this entry sets for its model (fields left out take the server's)."""
        values = self.model_dump(exclude=set(self.FLEET_FIELDS), exclude_none=True)
        return dict(values)


class Registry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    default: str
    models: dict[str, ModelEntry]
    serve: list[ServeEntry] = Field(
        default_factory=list, description="Models to serve together when no --model is given (server/fleet)."
    )

    def entry(self, name: str) -> ModelEntry:
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(sorted(self.models))
            raise RegistryError(f"unknown model {name!r}; models.yaml knows: {known}") from None


def load_registry(path: Path = DEFAULT_REGISTRY_PATH) -> Registry:
    """Read and validate models.yaml; a bad field raises RegistryError naming it."""
    try:
        raw: Any = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RegistryError(f"cannot read {path}: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), dict):
        raise RegistryError(f"{path}: expected a mapping with a 'models' mapping")
    models = {name: {**(body or {}), "name": name} for name, body in raw["models"].items()}
    try:
        registry = Registry.model_validate({**raw, "models": models})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise RegistryError(f"{path}: {where}: {first['msg']}") from exc
    if registry.default not in registry.models:
        raise RegistryError(f"{path}: default model {registry.default!r} is not listed under models")
    return registry


def package_file(source: PackageSource) -> Path:
    """Path of a file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(source.module)
    if spec is None or not spec.submodule_search_locations:
        raise RegistryError(f"Python package {source.module!r} is not installed (pip install it)")
    path = Path(next(iter(spec.submodule_search_locations))) / source.file
    if not path.is_file():
        raise RegistryError(f"{path} is missing from the installed package {source.module!r}")
    return path


class ResolvedModel(BaseModel):
    """A model name (or path) turned into a GGUF file on this machine."""

    model_config = ConfigDict(frozen=True)
    name: str = Field(description="The id clients use in the API's `model` field.")
    path: Path
    context: int | None = None
    chat_template: str | None = None


def resolve_model(name_or_path: str, registry: Registry | None = None) -> ResolvedModel:
    """Find the GGUF for a models.yaml name or a path; raise RegistryError saying what to do otherwise."""
    candidate = Path(name_or_path).expanduser()
    if name_or_path.endswith(".gguf") or candidate.is_file():
        if not candidate.is_file():
            raise RegistryError(f"model file {candidate} does not exist")
        return ResolvedModel(name=candidate.stem, path=candidate.resolve())
    registry = registry or load_registry()
    entry = registry.entry(name_or_path)
    if entry.package is not None:
        path = package_file(entry.package)
    elif entry.hub is not None:
        path = _hub_cached_file(entry)
    else:
        raise RegistryError(f"model {entry.name!r} has neither a package nor a hub source in models.yaml")
    return ResolvedModel(name=entry.name, path=path, context=entry.context, chat_template=entry.chat_template)


def _hub_cached_file(entry: ModelEntry) -> Path:
    """The first shard of the default quantization if it is already in the Hugging Face cache."""
    assert entry.hub is not None
    path = find_cached_gguf(entry.hub.repo, entry.hub.quants[entry.hub.default_quant], entry.hub.revision)
    if path is None:
        raise RegistryError(f"model {entry.name!r} is not downloaded yet; run: python -m convert pull {entry.name}")
    return path
