"""From settings to a running model: resolve the GGUF, decide llama.cpp's parameters, build the engine.

Without --auto-offload the settings say everything (slots, context, KV type, GPU layers). With it, the
offload planner reads the GGUF header and this machine and decides placement, KV type, context and batch
sizes; the plan is logged as a table, checked against what llama.cpp then reports it allocated, and kept
in the engine's load report (served at GET /plan). A load that runs out of memory is re-planned with a
larger GPU margin instead of ending the server.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bindings.llama_backend import LlamaBackend, LlamaBackendConfig, supports_gpu_offload
from bindings.protocol import BackendError
from convert.pull import ensure_model
from offload.gguf_shape import read_model_shape
from offload.hardware import GIB, detect
from offload.placement import placement_for
from offload.planner import Plan, PlanRequest, plan, replan_with_margin
from offload.table import render_table
from offload.verify import BufferCheck, check, expected_buffers
from registry.models import ResolvedModel, load_registry
from server.boot.bufts_probe import ProbeVerdict, resolve_use_extra_bufts
from server.engine.engine import Engine, EngineConfig
from server.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MAX_CTX = 8192  # per slot, when neither the user nor models.yaml says
OOM_RETRIES = 2  # re-plans after a load that ran out of memory, each with 1 GiB more GPU margin
MEMORY_CHECK_TOLERANCE = 0.02


@dataclass(frozen=True)
class LoadPlan:
    """What build_engine decided, before loading anything."""

    model: ResolvedModel
    served_name: str
    backend: LlamaBackendConfig
    engine: EngineConfig


def resolve_settings_model(settings: Settings) -> ResolvedModel:
    """The GGUF the settings name (a models.yaml name, or a path), pulled on first use when allowed."""
    registry = load_registry(settings.models_file)
    return ensure_model(settings.model or registry.default, allow_download=settings.allow_download, registry=registry)


def engine_config(settings: Settings, n_batch: int) -> EngineConfig:
    return EngineConfig(
        max_batch_tokens=n_batch,
        max_queue=settings.max_queue,
        request_timeout_s=settings.request_timeout_s,
        prefix_reuse=settings.prefix_reuse,
        prompt_cache_entries=settings.prompt_cache_entries,
    )


def plan_load(settings: Settings, model: ResolvedModel, *, use_extra_bufts: bool) -> LoadPlan:
    """The manual path: every llama.cpp parameter straight from the settings."""
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
        type_k=settings.kv_type,
        type_v=settings.kv_type,
        flash_attn=settings.flash_attn,
        use_mmap=settings.mmap,
        use_mlock=settings.mlock,
    )
    return LoadPlan(model, settings.served_model_name or model.name, backend, engine_config(settings, n_batch))


def offload_backend_config(offload_plan: Plan, verdict: ProbeVerdict) -> LlamaBackendConfig:
    """The planner's llama.cpp parameters; the probe may still veto extra buffer types."""
    placement = placement_for(offload_plan)
    kwargs = placement.backend_config_kwargs()
    kwargs["use_extra_bufts"] = placement.use_extra_bufts and verdict.use_extra_bufts
    kwargs["tensor_split"] = placement.tensor_split
    return LlamaBackendConfig(**kwargs)


def build_engine(settings: Settings) -> Engine:
    """Resolve, probe, (plan,) load. Slow (seconds to minutes): the app runs it off the event loop."""
    model = resolve_settings_model(settings)
    verdict = resolve_use_extra_bufts(settings.extra_bufts, cache_dir=settings.cache_dir)
    log.info("extra buffer types: %s (%s)", "on" if verdict.use_extra_bufts else "off", verdict.reason)
    served_name = settings.served_model_name or model.name
    report: dict[str, Any] = {"model": served_name, "path": str(model.path), "extra_bufts": asdict(verdict)}
    if settings.auto_offload:
        backend, n_batch = _load_with_plan(settings, model, verdict, served_name, report)
        engine = engine_config(settings, n_batch)
    else:
        load = plan_load(settings, model, use_extra_bufts=verdict.use_extra_bufts)
        log.info("loading %s from %s", load.served_name, load.model.path)
        backend = LlamaBackend(Path(load.model.path), load.backend, name=load.served_name)
        engine = load.engine
    info = backend.info
    log.info(
        "loaded %s (%s): %d slots × %d tokens of context, %d tokens per step",
        info.name,
        info.architecture,
        info.n_slots,
        info.n_ctx_per_slot,
        engine.max_batch_tokens,
    )
    return Engine(backend, engine, load_report=report)


def _load_with_plan(
    settings: Settings, model: ResolvedModel, verdict: ProbeVerdict, served_name: str, report: dict[str, Any]
) -> tuple[LlamaBackend, int]:
    shape = read_model_shape(model.path)
    hardware = detect(cache_path=settings.cache_dir / "hardware.json", with_gpus=supports_gpu_offload())
    request = PlanRequest(ctx=settings.ctx_size, parallel=settings.parallel, model_name=served_name)
    offload_plan = plan(shape, hardware, request)
    for attempt in range(OOM_RETRIES + 1):
        log.info("offload plan:\n%s", render_table(offload_plan, shape))
        config = offload_backend_config(offload_plan, verdict)
        try:
            backend = LlamaBackend(Path(model.path), config, name=served_name)
        except BackendError as exc:
            if attempt == OOM_RETRIES or not _out_of_memory(exc):
                raise
            extra_bytes = (attempt + 1) * GIB
            log.warning("load ran out of memory (%s); re-planning with %d GiB more GPU margin", exc, attempt + 1)
            offload_plan = replan_with_margin(shape, hardware, request, extra_bytes)
            continue
        checks = check(expected_buffers(offload_plan, shape), backend.memory_report())
        _log_memory_checks(checks)
        report["plan"] = offload_plan.to_json()
        report["memory_check"] = [_check_json(c) for c in checks]
        return backend, offload_plan.n_batch
    raise AssertionError("unreachable: the last attempt either returns or raises")


def _out_of_memory(exc: BackendError) -> bool:
    text = str(exc).lower()
    return any(word in text for word in ("out of memory", "failed to allocate", "alloc"))


def _log_memory_checks(checks: tuple[BufferCheck, ...]) -> None:
    for item in checks:
        level = logging.INFO if item.within(MEMORY_CHECK_TOLERANCE) else logging.WARNING
        log.log(
            level,
            "memory %s %s: predicted %.2f MiB, llama.cpp allocated %.2f MiB (%+.1f%%)",
            item.kind,
            item.name,
            item.predicted_bytes / 2**20,
            item.reported_bytes / 2**20,
            100 * item.relative_error if item.reported_bytes else 0.0,
        )


def _check_json(item: BufferCheck) -> dict[str, Any]:
    return {
        "kind": item.kind,
        "buffer": item.name,
        "predicted_bytes": item.predicted_bytes,
        "reported_bytes": item.reported_bytes,
        "relative_error": item.relative_error if item.reported_bytes else None,
        "within_tolerance": item.within(MEMORY_CHECK_TOLERANCE),
    }
