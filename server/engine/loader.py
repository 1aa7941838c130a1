"""From settings to a running model: resolve the GGUF, decide llama.cpp's parameters, build the engine."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from convert.pull import ensure_model
from convert.registry import ResolvedModel, load_registry
from server.engine.bufts_probe import resolve_use_extra_bufts
from server.engine.engine import Engine, EngineConfig
from server.engine.llama_backend import LlamaBackend, LlamaBackendConfig
from server.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MAX_CTX = 8192  # per slot, when neither the user nor models.yaml says


@dataclass(frozen=True)
class LoadPlan:
    """What build_engine decided, before loading anything."""

    model: ResolvedModel
    served_name: str
    backend: LlamaBackendConfig
    engine: EngineConfig


def resolve_settings_model(settings: Settings) -> ResolvedModel:
    """The GGUF the settings name (a models.yaml name, or a path), without loading it."""
    registry = load_registry(settings.models_file)
    return ensure_model(settings.model or registry.default, allow_download=settings.allow_download, registry=registry)


def plan_load(settings: Settings, model: ResolvedModel, *, use_extra_bufts: bool) -> LoadPlan:
    n_ctx_per_slot = settings.ctx_size or min(model.context or DEFAULT_MAX_CTX, DEFAULT_MAX_CTX)
    threads = settings.effective_threads()
    n_batch = max(settings.max_batch_tokens, settings.parallel)
    backend = LlamaBackendConfig(
        n_slots=settings.parallel,
        n_ctx_per_slot=n_ctx_per_slot,
        n_batch=n_batch,
        n_ubatch=min(settings.n_ubatch, n_batch),
        n_threads=threads,
        n_threads_batch=settings.threads_batch or threads,
        use_extra_bufts=use_extra_bufts,
        n_gpu_layers=settings.n_gpu_layers,
        tensor_overrides=(),
        type_k=settings.kv_type,
        type_v=settings.kv_type,
        flash_attn=settings.flash_attn,
        use_mmap=settings.mmap,
        use_mlock=settings.mlock,
    )
    engine = EngineConfig(
        max_batch_tokens=n_batch,
        max_queue=settings.max_queue,
        request_timeout_s=settings.request_timeout_s,
        prefix_reuse=settings.prefix_reuse,
    )
    return LoadPlan(model, settings.served_model_name or model.name, backend, engine)


def build_engine(settings: Settings) -> Engine:
    """Resolve, probe, load. Slow (seconds to minutes): the app runs it off the event loop."""
    model = resolve_settings_model(settings)
    verdict = resolve_use_extra_bufts(settings.extra_bufts, cache_dir=settings.cache_dir)
    log.info("extra buffer types: %s (%s)", "on" if verdict.use_extra_bufts else "off", verdict.reason)
    plan = plan_load(settings, model, use_extra_bufts=verdict.use_extra_bufts)
    log.info("loading %s from %s", plan.served_name, plan.model.path)
    backend = LlamaBackend(Path(plan.model.path), plan.backend, name=plan.served_name)
    info = backend.info
    log.info(
        "loaded %s (%s): %d slots × %d tokens of context, %d tokens per step",
        info.name,
        info.architecture,
        info.n_slots,
        info.n_ctx_per_slot,
        plan.engine.max_batch_tokens,
    )
    return Engine(backend, plan.engine)
