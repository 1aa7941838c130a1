"""The one settings object. Every field is described; CLI flags (--kebab-case) and environment variables
(QWEN3_LOCAL_UPPER_CASE) derive from it, so the three can never drift apart."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from registry.models import DEFAULT_REGISTRY_PATH, ServeEntry
from server.config_file import DEFAULT_PROFILE, ConfigFileError, customise_sources

ENV_PREFIX = "QWEN3_LOCAL_"
AUDIT_DB_SCHEMES = ("sqlite:///", "postgresql://", "postgres://", "postgresql+psycopg://")


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "qwen3-local"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return customise_sources(settings_cls, init_settings, env_settings)

    # --- where settings come from ------------------------------------------------------------------
    config: Path | None = Field(
        default=None,
        description="A TOML or YAML file of settings (keys: these settings' names) with optional "
        "[profiles.NAME] tables; environment variables and flags override it (see server/config_file.py).",
    )
    profile: str = Field(
        default=DEFAULT_PROFILE,
        description="The config file's profile to use (dev, prod, ...). prod refuses to start without "
        "authentication and an audit log.",
    )

    # --- model -------------------------------------------------------------------------------------
    model: Annotated[list[str] | None, NoDecode] = Field(
        default=None,
        description="A models.yaml name or a path to a .gguf file (default: models.yaml's default); repeat the "
        "flag to serve several models (see README 'Several models'). The environment variable takes one name, "
        "or a JSON list.",
    )
    serve: list[ServeEntry] = Field(
        default_factory=list,
        description="Models to serve together, each with its id, aliases and own settings (a --config file's or "
        "models.yaml's `serve:` list; as a flag or environment variable, a JSON list). Used when no --model is given.",
    )
    preload: Annotated[list[str] | None, NoDecode] = Field(
        default=None,
        description="Model ids to load at start, repeatable ('all': every one); the others load on their first "
        "request. Default: the first model only.",
    )
    keep_alive: str | None = Field(
        default=None,
        description="How long an idle model stays loaded (Ollama's keep_alive: '5m', seconds, 0, -1 = forever); a "
        "request's `keep_alive` overrides it. Default: forever for preloaded models, 5m for the others.",
    )
    memory_budget_mib: int | None = Field(
        default=None,
        ge=1,
        description="Memory (MiB) all loaded models may take together (weights + KV cache); a model that does not "
        "fit evicts the least recently used idle one. Default: RAM less the planner's margin, plus GPU memory.",
    )
    load_wait_s: float = Field(
        default=30.0,
        ge=0,
        description="How long a request for a model that does not fit waits for memory to free before a 503.",
    )
    load_queue: int = Field(
        default=16, ge=0, description="Requests that may wait for memory to load their model; more get 503."
    )
    models_file: Path = Field(default=DEFAULT_REGISTRY_PATH, description="The model registry to read.")
    served_model_name: str | None = Field(
        default=None,
        description="The id clients send as `model` (default: the models.yaml name or file stem).",
    )
    allow_download: bool = Field(
        default=True, description="Pull a models.yaml model from the Hugging Face hub on first use."
    )
    chat_template: str | None = Field(
        default=None, description="Path to a Jinja chat template that replaces the GGUF's own."
    )

    # --- serving -----------------------------------------------------------------------------------
    data_dir: Path = Field(
        default_factory=lambda: default_data_dir(),
        description="Where the server keeps its own files (API keys, the default SQLite audit database, the "
        "audit spool). Default: $XDG_DATA_HOME/qwen3-local, else ~/.local/share/qwen3-local.",
    )
    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port to listen on.")
    api_key: str | None = Field(default=None, description="If set, clients must send `Authorization: Bearer KEY`.")
    allow_no_auth: bool = Field(
        default=False,
        description="Listen on a non-loopback --host without an --api-key (otherwise the server refuses to start).",
    )
    # --- who may call (server/auth; README "Authentication") ----------------------------------------
    keys_file: Path | None = Field(
        default=None,
        description="The named API keys (`python -m server keys add|list|revoke`), stored as SHA-256 hashes; "
        "reloaded on SIGHUP. Default: DATA_DIR/keys.json. Any key in it turns authentication on.",
    )
    jwt_secret: str | None = Field(default=None, description="Accept HS256 JWT bearer tokens signed with this secret.")
    jwt_public_key: Path | None = Field(
        default=None, description="Accept RS256 JWT bearer tokens verified with this PEM (or JWK) public key file."
    )
    jwt_jwks_file: Path | None = Field(
        default=None, description="Accept RS256 JWT bearer tokens verified with their `kid`'s key in this JWKS file."
    )
    jwt_issuer: str | None = Field(default=None, description="The `iss` JWTs must carry (unchecked if unset).")
    jwt_audience: str | None = Field(default=None, description="The `aud` JWTs must carry (unchecked if unset).")
    jwt_scopes_claim: str = Field(
        default="scope", description="The JWT claim holding the scopes: a space-separated string or a list."
    )
    rate_limit_rpm: int | None = Field(
        default=None, ge=1, description="Requests per minute per key or JWT subject without a limit of its own."
    )
    rate_limit_tpm: int | None = Field(
        default=None,
        ge=1,
        description="Tokens per minute (prompt estimate + max_tokens, charged on admission) per key or JWT subject "
        "without a limit of its own.",
    )
    parallel: int = Field(default=4, ge=1, le=256, description="Slots: sequences decoded together (n_seq_max).")
    ctx_size: int | None = Field(
        default=None,
        ge=16,
        description="Context length of each slot (prompt + output). Default: the model's models.yaml context, "
        "else its training context, capped at 8192.",
    )
    max_queue: int = Field(
        default=64, ge=0, description="Requests that may wait for a free slot; more get 429 with Retry-After."
    )
    request_timeout_s: float = Field(
        default=600.0, gt=0, description="A request still unfinished after this many seconds fails with 504."
    )
    stream_interval_ms: float = Field(
        default=20.0,
        ge=0,
        le=1000,
        description="Streamed tokens go to the client at most this often (ms): the tokens of quicker steps travel "
        "together, one event each interval, which spares the server and the client a wake-up and a socket write "
        "per token (vLLM's --stream-interval counts tokens instead). A choice's first and last tokens never wait, "
        "and a model slower than this streams every token as it comes. 0: every step's tokens at once.",
    )
    max_batch_tokens: int = Field(
        default=512,
        ge=1,
        description="Token budget of one step: decode tokens of every running slot plus prefill chunks (n_batch).",
    )
    prompt_cache_mib: int | None = Field(
        default=None,
        ge=0,
        description="RAM (MiB) for the prompt cache: states of past sequences kept after their slot is reused, so "
        "a later request with the same prefix (a returning conversation, a repeated prompt) skips its prefill, like "
        "llama-server's --cache-ram. Least recently used entries go first to stay within it. An entry costs what "
        "llama.cpp reports for the sequence's state: its KV (e.g. 23 KB/token for SmolLM2) plus, on Qwen3-Next, "
        "75 MiB of recurrent state (843 MiB at 32k tokens). Default: half the RAM left once the weights, KV cache, "
        "recurrent state, compute buffers and per-slot snapshots are counted: with --auto-offload the plan's "
        "(`python -m offload plan`, GET /plan), otherwise available RAM less the whole model file, KV cache, "
        "recurrent state and snapshots, as if nothing were on a GPU. 0: off.",
    )
    default_top_k: int = Field(
        default=40,
        ge=0,
        description="top_k for requests that do not set one (llama-server's default; 0: the whole vocabulary). "
        "Sampling without it sorts every token: ~0.5 ms per token on a CPU.",
    )
    reasoning_format: Literal["auto", "deepseek", "none"] = Field(
        default="auto",
        description="How chat answers return reasoning (<think>...</think>), as llama-server's flag: deepseek = "
        "in message.reasoning_content (delta.reasoning_content when streaming), content clean; none = left in "
        "content as written; auto = deepseek for chat templates that know <think> blocks (Qwen3), else none. "
        "A request may override it with `reasoning_format`.",
    )
    prefix_reuse: bool = Field(
        default=True, description="Reuse a slot's cached prompt prefix (KV or saved state) for a new request."
    )
    # --- speculative decoding (README "Speculative decoding") --------------------------------------------
    spec_type: Literal["none", "ngram", "draft", "mtp"] = Field(
        default="none",
        description="Speculative decoding: draft tokens and verify them in the step's one decode. ngram: from the "
        "sequence's own prompt and output (any model); draft: a small model of the same vocabulary (--draft-model); "
        "mtp: Qwen3-Next's multi-token-prediction head (bindings/mtp.py). Drafts only while the step is small and "
        "a slot's drafts are accepted; a request may opt out with `speculative: false`. none: off.",
    )
    draft_max: int = Field(
        default=32,
        ge=1,
        le=64,
        description="Most tokens drafted per slot and step; a slot drafts fewer while its acceptance is lower "
        "(32 beat 16 on bench.speculation's quotes once the n-gram drafter followed the aligned copy).",
    )
    draft_min: int = Field(default=2, ge=1, description="Fewer drafted tokens than this are not verified.")
    draft_model: Path | None = Field(
        default=None, description="The GGUF of the draft model for --spec-type draft (its vocabulary: the model's)."
    )
    spec_max_step_tokens: int = Field(
        default=33,
        ge=2,
        description="Draft only while a step stays within this many tokens (33: one slot's token and a full draft "
        "of 32). Whether a busy step drafts at all is --spec-max-break-even's call.",
    )
    spec_max_break_even: float = Field(
        default=0.9,
        ge=0.0,
        le=1.0,
        description="No drafting in a step where a draft pays only above this acceptance: every slot decoding in a "
        "step waits for its verification, so the busier the step, the likelier a draft must be (16 busy streams of "
        "SmolLM2 on 2 CPU threads: ~0.99, and drafting stops). 1 turns this off.",
    )
    embeddings: bool = Field(
        default=False,
        description="Serve POST /v1/embeddings (also on when the model's models.yaml entry says `embedding: true`): "
        "a second, small llama.cpp context on the same weights; an input may have up to --max-batch-tokens tokens.",
    )
    pooling: Literal["mean", "cls", "last"] | None = Field(
        default=None,
        description="How embeddings pool an input's token states (like llama-server's --pooling). Default: the "
        "GGUF's <arch>.pooling_type, else mean (chat models such as SmolLM2 or Qwen3 name none).",
    )

    # --- audit log (server/audit; README "Audit log") ------------------------------------------------
    audit: bool = Field(
        default=False,
        description="Record every API request in the tamper-evident audit log (on by itself when --audit-db is "
        "set); the database is then <data-dir>/audit.sqlite3 unless --audit-db names one.",
    )
    audit_db: str | None = Field(
        default=None,
        description="The audit database: sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB (turns auditing on).",
    )
    audit_content: Literal["full", "hashes", "none"] = Field(
        default="full",
        description="What the audit log keeps of prompts and outputs: the full text, only their SHA-256, or none.",
    )
    audit_required: bool | None = Field(
        default=None,
        description="Answer 503 rather than serve unaudited when the audit spool is full (default: on when "
        "auditing is on).",
    )
    audit_retention_days: int | None = Field(
        default=None, ge=1, description="Delete audit records older than this many days (default: keep all)."
    )
    audit_spool_mib: int = Field(
        default=64,
        ge=1,
        description="Most MiB of audit records spooled to <data-dir>/audit-spool.jsonl while the database is "
        "unreachable; replayed in order when it returns.",
    )

    # --- llama.cpp ---------------------------------------------------------------------------------
    threads: int | None = Field(default=None, ge=1, description="CPU threads for decoding (default: physical cores).")
    threads_batch: int | None = Field(default=None, ge=1, description="CPU threads for prefill (default: threads).")
    n_ubatch: int = Field(default=512, ge=1, description="Physical micro-batch size inside one decode.")
    n_gpu_layers: int = Field(default=-1, description="Layers to offload to the GPU (-1: all; ignored on CPU).")
    kv_type: Literal["f16", "f32", "q8_0", "q4_0"] = Field(default="f16", description="KV cache data type.")
    flash_attn: Literal["auto", "on", "off"] = Field(default="auto", description="llama.cpp flash attention.")
    mmap: bool = Field(default=True, description="Memory-map the model file.")
    mlock: bool = Field(default=False, description="Lock the model in RAM.")
    extra_bufts: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="llama.cpp's extra CPU buffer types (AMX, repacking). auto: probe once per machine and "
        "llama.cpp build in a child process, and turn them off where they crash or compute wrong results.",
    )
    auto_offload: bool = Field(
        default=False,
        description="Plan GPU/CPU placement of layers and MoE experts, context and KV type from the GGUF and "
        "this machine (see `python -m offload plan`).",
    )
    # --- other machines (llama.cpp RPC workers: `python -m server rpc-worker`; README "Several machines (RPC)")
    rpc: str | None = Field(
        default=None,
        description="RPC workers to place layers on, comma-separated host:port (like llama-server's --rpc). They "
        "take the last --n-gpu-layers layers, split by their free memory; with --auto-offload the planner splits "
        "whole layers over this machine and every worker. A worker that does not answer at start stops the server.",
    )
    rpc_link: str = Field(
        default="1Gbit",
        description="The network link to the RPC workers (e.g. 10Gbit, 1.25GB/s), for the planner's traffic "
        "model; the latency is measured at start.",
    )

    cache_dir: Path = Field(
        default_factory=lambda: Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen3-local",
        description="Where probe verdicts and hardware profiles are cached ($XDG_CACHE_HOME/qwen3-local).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log level.")

    @field_validator("model", "preload", mode="before")
    @classmethod
    def _one_or_more_names(cls, value: Any) -> Any:
        """A single name (a flag, an environment variable, Settings(model="x")) is a list of one; an environment
        variable may also hold a JSON list."""
        if isinstance(value, str):
            text = value.strip()
            return json.loads(text) if text.startswith("[") else [value]
        return value

    @field_validator("rpc")
    @classmethod
    def _rpc_endpoints(cls, value: str | None) -> str | None:
        if value is None:  # the default (pydantic-settings validates defaults too): no workers
            return value
        for entry in (value or "").split(","):
            host, sep, port = entry.strip().partition(":")
            if not (host and sep and port.isdigit() and 0 < int(port) < 65536):
                raise ValueError(f"{entry.strip()!r} is not host:port (an IPv4 address or host name, and a port)")
        return value

    @field_validator("rpc_link")
    @classmethod
    def _rpc_link_speed(cls, value: str) -> str:
        from offload.hardware import HardwareError  # deferred: the planner's parsers, only for this check
        from offload.rpc import parse_link

        try:
            parse_link(value)
        except HardwareError as exc:
            raise ValueError(str(exc)) from exc
        return value

    def rpc_endpoints(self) -> tuple[str, ...]:
        """The --rpc workers, in order ('' when none)."""
        return tuple(entry.strip() for entry in self.rpc.split(",")) if self.rpc else ()

    def primary_model(self) -> str | None:
        """The first --model (the default model), or None for models.yaml's default."""
        return self.model[0] if self.model else None

    def effective_keys_file(self) -> Path:
        return self.keys_file if self.keys_file is not None else self.data_dir / "keys.json"

    @field_validator("draft_min")
    @classmethod
    def _draft_bounds(cls, value: int, info: ValidationInfo) -> int:
        if value > info.data.get("draft_max", value):
            raise ValueError(f"must not exceed --draft-max ({info.data['draft_max']})")
        return value

    @field_validator("draft_model")
    @classmethod
    def _draft_model_for_draft(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if info.data.get("spec_type") == "draft" and value is None:
            raise ValueError("--spec-type draft needs the draft model's GGUF (--draft-model PATH)")
        return value

    @field_validator("audit_db")
    @classmethod
    def _audit_db_url(cls, value: str | None) -> str | None:
        if value is None or value.startswith(AUDIT_DB_SCHEMES):
            return value
        raise ValueError("must be sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB")

    def effective_audit_db(self) -> str | None:
        """The audit database URL, or None when auditing is off."""
        if self.audit_db:
            return self.audit_db
        return f"sqlite:///{self.data_dir / 'audit.sqlite3'}" if self.audit else None

    def effective_audit_required(self) -> bool:
        return self.audit_required if self.audit_required is not None else self.effective_audit_db() is not None

    def effective_threads(self) -> int:
        return self.threads or physical_cores()


def physical_cores() -> int:
    """This machine's physical CPU cores (its logical ones where psutil cannot tell)."""
    import psutil  # deferred, as before: reading settings needs no system probe

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _argument_options(annotation: Any) -> dict[str, Any]:
    """argparse keyword arguments for a field's type: bools become --x/--no-x, Literals become choices."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    base = args[0] if get_origin(annotation) is not None and args else annotation
    if get_origin(annotation) is list:
        base = annotation
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if get_origin(base) is list:  # --model A --model B; a list of entries (--serve) is one JSON list
        if get_args(base) == (str,):
            return {"action": "append", "type": str, "metavar": "NAME"}
        return {"type": json.loads, "metavar": "JSON"}
    if get_origin(base) is Literal:
        return {"choices": list(get_args(base))}
    return {"type": str, "metavar": base.__name__.upper() if hasattr(base, "__name__") else "VALUE"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="qwen3-local: an OpenAI-compatible server for GGUF models with continuous batching. "
        f"Every flag can also be set as an environment variable {ENV_PREFIX}<NAME>.",
    )
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        parser.add_argument(
            _flag(name),
            dest=name,
            default=argparse.SUPPRESS,
            help=f"{field.description} [default: {default}]",
            **_argument_options(field.annotation),
        )
    return parser


def is_loopback_host(host: str) -> bool:
    """Whether `host` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name or "" (all interfaces): reachable from elsewhere


def exposure_error(settings: Settings) -> str | None:
    """One line saying why the server must not start, or None: listening beyond loopback without an API key
    (--api-key, a named key or a JWT key) must be a deliberate choice, and a key file must be readable."""
    from server.auth.snapshot import AuthConfigError, auth_configured  # deferred: server.auth imports this module

    try:
        configured = auth_configured(settings)
    except AuthConfigError as exc:  # an unreadable key file must stop the start, wherever it listens
        return str(exc)
    if is_loopback_host(settings.host) or settings.allow_no_auth or configured:
        return None
    return (
        f"refusing to listen on {settings.host or 'all interfaces'} without an API key: set {ENV_PREFIX}API_KEY "
        f"(--api-key), add a key with `python -m server keys add NAME`, configure a JWT key (--jwt-secret, "
        f"--jwt-public-key, --jwt-jwks-file), or {ENV_PREFIX}ALLOW_NO_AUTH=1 (--allow-no-auth) to serve anyone "
        "who can reach the port"
    )


def profile_error(settings: Settings) -> str | None:
    """One line saying why the prod profile must not start, or None: a production deployment authenticates its
    callers and keeps an audit log, whatever else its config file says."""
    if settings.profile != "prod":
        return None
    from server.auth.snapshot import AuthConfigError, auth_configured  # deferred: server.auth imports this module

    try:
        configured = auth_configured(settings)
    except AuthConfigError as exc:
        return str(exc)
    missing = []
    if not configured:
        missing.append("authentication (--api-key, a key from `python -m server keys add NAME`, or a JWT key)")
    if settings.effective_audit_db() is None:
        missing.append("an audit log (--audit-db URL, or --audit for the SQLite one in --data-dir)")
    if missing:
        return f"the prod profile refuses to start without {' and '.join(missing)}"
    return None


class SettingsError(ValueError):
    """A flag or environment variable has a bad value; the message names it."""


def load_settings(argv: list[str] | None = None) -> Settings:
    """Settings from defaults < environment < command line; errors name the flag."""
    parsed = vars(build_parser().parse_args(argv))
    try:
        return Settings(**parsed)
    except ConfigFileError as exc:
        raise SettingsError(str(exc)) from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "?"
        raise SettingsError(f"{_flag(name)} / {ENV_PREFIX}{name.upper()}: {first['msg']}") from exc
