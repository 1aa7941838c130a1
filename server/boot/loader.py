"""From settings to a running model: resolve the GGUF, decide llama.cpp's parameters, build the engine.

Without --auto-offload the settings say everything (slots, context, KV type, GPU layers). With it, the
offload planner reads the GGUF header and this machine and decides placement, KV type, context and batch
sizes; the plan is logged as a table, checked against what llama.cpp then reports it allocated, and kept
in the engine's load report (served at GET /plan). A load that runs out of memory is re-planned with a
larger GPU margin instead of ending the server.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import psutil

from bindings.devices import list_devices
from bindings.draft_model import DraftModelConfig, LlamaDraftModel
from bindings.embedder import EmbedderConfig, LlamaEmbedder
from bindings.llama_backend import LlamaBackend, LlamaBackendConfig, supports_gpu_offload
from bindings.mtp import MtpDrafter
from bindings.protocol import BackendError, Drafter
from convert.pull import ensure_model, locate_model
from offload.gguf_shape import GgufError, KvType, read_model_shape
from offload.hardware import GIB, MIB, detect
from offload.placement import placement_for
from offload.planner import (
    Plan,
    PlanRequest,
    host_ram_left,
    plan,
    prompt_cache_bytes_for,
    ram_margin,
    replan_with_margin,
)
from offload.table import render_table
from offload.verify import BufferCheck, check, expected_buffers
from registry.models import ResolvedModel, load_registry
from server.boot.bufts_probe import ProbeVerdict, resolve_use_extra_bufts
from server.engine.core_share import CoreShare
from server.engine.engine import Engine, EngineConfig
from server.engine.speculation import NgramDrafter, SpeculationConfig
from server.rpc.boot import memory_check as rpc_memory_check
from server.rpc.boot import planned_backend, register_workers, report_workers
from server.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MAX_CTX = 8192  # per slot, when neither the user nor models.yaml says
OOM_RETRIES = 2  # re-plans after a load that ran out of memory, each with 1 GiB more GPU margin
MEMORY_CHECK_TOLERANCE = 0.02
DOWNLOAD_LOG_INTERVAL_S = 10.0  # a 45 GiB pull takes minutes to hours: a line every 10 s shows it moving


class LoadObserver(Protocol):
    """Hears how a load goes, from the loader thread (the app's state, which /health reports)."""

    def downloading(self, bytes_done: int, bytes_total: int) -> None: ...

    def downloaded(self) -> None: ...


@dataclass(frozen=True)
class LoadPlan:
    """What build_engine decided, before loading anything."""

    model: ResolvedModel
    served_name: str
    backend: LlamaBackendConfig
    engine: EngineConfig


def locate_settings_model(settings: Settings) -> tuple[str, ResolvedModel | None]:
    """(the model's name, its local GGUF), or (name, None) when it is still to be downloaded; never downloads.
    RegistryError when the name can never resolve here (unknown, or to download while downloads cannot happen):
    the CLI says so before binding the port."""
    registry = load_registry(settings.models_file)
    name = settings.primary_model() or registry.default
    return name, locate_model(name, allow_download=settings.allow_download, registry=registry)


class DownloadLog:
    """A pull's progress callback: tells the observer every report, and logs the first, the last, and one
    every `interval_s` between them."""

    def __init__(
        self,
        name: str,
        observer: LoadObserver | None = None,
        *,
        interval_s: float = DOWNLOAD_LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.started = False
        self._observer = observer
        self._interval_s = interval_s
        self._clock = clock
        self._logged_at: float | None = None
        self._logged_complete = False

    def __call__(self, bytes_done: int, bytes_total: int) -> None:
        self.started = True
        if self._observer is not None:
            self._observer.downloading(bytes_done, bytes_total)
        now = self._clock()
        complete = bytes_done >= bytes_total
        due = self._logged_at is None or now - self._logged_at >= self._interval_s
        if (complete and not self._logged_complete) or (due and not complete):
            self._logged_at = now
            self._logged_complete = complete
            percent = 100 * bytes_done / bytes_total if bytes_total else 100.0
            log.info(
                "downloading %s: %.2f of %.2f GB (%.0f%%)", self.name, bytes_done / 1e9, bytes_total / 1e9, percent
            )


def resolve_settings_model(settings: Settings, observer: LoadObserver | None = None) -> ResolvedModel:
    """The GGUF the settings name (a models.yaml name, or a path), pulled on first use when allowed; the
    observer hears the download's progress, then that it is over."""
    registry = load_registry(settings.models_file)
    name = settings.primary_model() or registry.default
    progress = DownloadLog(name, observer)
    model = ensure_model(name, allow_download=settings.allow_download, registry=registry, progress=progress)
    if progress.started:
        log.info("downloaded %s to %s", name, model.path)
        if observer is not None:
            observer.downloaded()
    return model


def engine_config(settings: Settings, n_batch: int, prompt_cache_bytes: int = 0) -> EngineConfig:
    return EngineConfig(
        max_batch_tokens=n_batch,
        max_queue=settings.max_queue,
        request_timeout_s=settings.request_timeout_s,
        prefix_reuse=settings.prefix_reuse,
        prompt_cache_bytes=prompt_cache_bytes,
        speculation=speculation_config(settings),
        stream_interval_s=settings.stream_interval_ms / 1000.0,
    )


def speculation_config(settings: Settings) -> SpeculationConfig | None:
    """--spec-type and its bounds (None: off)."""
    if settings.spec_type == "none":
        return None
    return SpeculationConfig(
        draft_max=settings.draft_max,
        draft_min=settings.draft_min,
        max_step_tokens=settings.spec_max_step_tokens,
        max_break_even=settings.spec_max_break_even,
    )


def build_drafter(settings: Settings, backend: LlamaBackend) -> Drafter | None:
    """The drafter --spec-type names, on the loaded backend (None: speculation off). Another kind of drafter (an
    MTP head) plugs in here: anything with the Drafter protocol's methods (bindings/protocol.py)."""
    if settings.spec_type == "none":
        return None
    if settings.spec_type == "ngram":
        return NgramDrafter()
    if settings.spec_type == "draft":
        assert settings.draft_model is not None  # the settings refuse draft without it
        info, config = backend.info, backend.config
        log.info("loading draft model %s", settings.draft_model)
        return LlamaDraftModel(
            settings.draft_model,
            DraftModelConfig(
                n_slots=info.n_slots,
                n_ctx_per_slot=info.n_ctx_per_slot,
                n_batch=min(info.n_batch, 512),
                n_threads=config.n_threads,
                use_extra_bufts=config.use_extra_bufts,
                n_gpu_layers=config.n_gpu_layers,
            ),
            target_n_vocab=info.n_vocab,
        )
    if settings.spec_type == "mtp":
        return _mtp_drafter(backend)
    raise BackendError(f"--spec-type {settings.spec_type}: the engine has no drafter of this kind")


def _mtp_drafter(backend: LlamaBackend) -> MtpDrafter:
    """The MTP head on the backend's own model and context (loaded with load_mtp, which checked the GGUF has
    a head). Made here, before the engine's first decode: it turns on the context's hidden states."""
    config = backend.config
    if not config.load_mtp:  # an MTP context on a model loaded without its block aborts the process
        raise BackendError("--spec-type mtp: the model was loaded without its MTP block (load_mtp)")
    log.info("MTP drafter on %s's multi-token-prediction head", backend.info.name)
    return MtpDrafter(
        backend.model_handle,
        backend.context_handle,
        mtp_loaded=True,
        n_threads=config.n_threads or os.cpu_count() or 1,  # decode-sized steps: the decode threads
    )


def prompt_cache_budget(settings: Settings, ram_left_bytes: int) -> dict[str, Any]:
    """The prompt cache's budget: --prompt-cache-mib when given, else the planner's share of the RAM left; as
    the load report (GET /plan) shows it."""
    if settings.prompt_cache_mib is None:
        budget, source = prompt_cache_bytes_for(ram_left_bytes), "default: half the RAM left"
    else:
        budget, source = settings.prompt_cache_mib * MIB, "--prompt-cache-mib"
        if budget > ram_left_bytes:
            log.warning(
                "--prompt-cache-mib %d is more than the %.0f MiB of RAM left after the model: a full cache may "
                "make the machine swap",
                settings.prompt_cache_mib,
                ram_left_bytes / MIB,
            )
    log.info("prompt cache: %.0f MiB (%s; %.0f MiB of RAM left)", budget / MIB, source, ram_left_bytes / MIB)
    return {"bytes": budget, "source": source, "ram_left_bytes": ram_left_bytes}


def manual_ram_left(model: ResolvedModel, backend: LlamaBackendConfig) -> int:
    """RAM left once the model and its memory are loaded on the manual path (offload.planner.host_ram_left:
    the whole model counted in RAM), from what is available now, before the load."""
    memory = psutil.virtual_memory()
    try:
        shape = read_model_shape(model.path)
    except GgufError as exc:  # a GGUF the planner cannot read still loads: count its file, not its KV cache
        log.warning(
            "cannot size %s's KV cache for the prompt cache's default (%s): counting the file only", model.path, exc
        )
        return max(0, memory.available - ram_margin(memory.total) - Path(model.path).stat().st_size)
    return host_ram_left(
        shape,
        ram_available_bytes=memory.available,
        ram_total_bytes=memory.total,
        ctx=backend.n_ctx_per_slot,
        parallel=backend.n_slots,
        # the planner never picks an f32 cache, so KvType has none: twice f16's bytes
        kv_bytes_per_token=shape.kv_bytes_per_token(KvType.F16) * 2
        if backend.type_k == "f32"
        else shape.kv_bytes_per_token(KvType(backend.type_k)),
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
        load_mtp=settings.spec_type == "mtp",
    )
    return LoadPlan(model, settings.served_model_name or model.name, backend, engine_config(settings, n_batch))


def offload_backend_config(offload_plan: Plan, verdict: ProbeVerdict) -> LlamaBackendConfig:
    """The planner's llama.cpp parameters; the probe may still veto extra buffer types."""
    placement = placement_for(offload_plan)
    kwargs = placement.backend_config_kwargs()
    kwargs["use_extra_bufts"] = placement.use_extra_bufts and verdict.use_extra_bufts
    kwargs["tensor_split"] = placement.tensor_split
    return LlamaBackendConfig(**kwargs)


def build_engine(
    settings: Settings,
    observer: LoadObserver | None = None,
    planned: Plan | None = None,
    core_share: CoreShare | None = None,
) -> Engine:
    """Resolve (download), probe, (plan,) load. Slow (seconds to hours): the app runs it off the event loop.
    `planned`: with --auto-offload, the model's share of a joint plan for several models (server/fleet), used
    instead of planning the model alone on the whole machine. `core_share`: the cores it splits with the other
    served models' engines."""
    model = resolve_settings_model(settings, observer)
    verdict = resolve_use_extra_bufts(settings.extra_bufts, cache_dir=settings.cache_dir)
    log.info("extra buffer types: %s (%s)", "on" if verdict.use_extra_bufts else "off", verdict.reason)
    served_name = settings.served_model_name or model.name
    report: dict[str, Any] = {"model": served_name, "path": str(model.path), "extra_bufts": asdict(verdict)}
    # --rpc: the workers become ggml devices before the model loads, so llama.cpp can place layers on them
    workers = register_workers(settings)
    if workers:
        report["rpc_workers"] = report_workers(workers)
    if settings.auto_offload and not workers:
        backend, offload_plan = _load_with_plan(settings, model, verdict, served_name, report, planned)
        report["prompt_cache"] = prompt_cache_budget(settings, offload_plan.ram_left_bytes)
        engine = engine_config(settings, offload_plan.n_batch, report["prompt_cache"]["bytes"])
    else:
        load = plan_load(settings, model, use_extra_bufts=verdict.use_extra_bufts)
        if workers and settings.auto_offload:  # whole layers over this machine and the workers (offload/rpc.py)
            rpc_backend = planned_backend(settings, Path(load.model.path), load.backend, workers, report)
            load = replace(load, backend=rpc_backend)
        report["prompt_cache"] = prompt_cache_budget(settings, manual_ram_left(load.model, load.backend))
        log.info("loading %s from %s", load.served_name, load.model.path)
        backend = LlamaBackend(Path(load.model.path), load.backend, name=load.served_name)
        if "rpc_plan" in report:  # what llama.cpp allocated on each worker, against the plan
            report["rpc_memory_check"] = rpc_memory_check(report["rpc_plan"], backend.memory_report())
        engine = replace(load.engine, prompt_cache_bytes=report["prompt_cache"]["bytes"])
    embedder = _embedder(settings, backend, report) if embeddings_wanted(settings) else None
    info = backend.info
    log.info(
        "loaded %s (%s): %d slots × %d tokens of context, %d tokens per step",
        info.name,
        info.architecture,
        info.n_slots,
        info.n_ctx_per_slot,
        engine.max_batch_tokens,
    )
    try:
        drafter = build_drafter(settings, backend)
    except BaseException:
        if embedder is not None:
            embedder.close()
        backend.close()
        raise
    report["speculation"] = {
        "spec_type": settings.spec_type,
        **(asdict(engine.speculation) if engine.speculation else {}),
    }
    return Engine(backend, engine, load_report=report, embedder=embedder, drafter=drafter, core_share=core_share)


def embeddings_wanted(settings: Settings) -> bool:
    """--embeddings, or `embedding: true` in the served model's models.yaml entry (a .gguf path has none)."""
    if settings.embeddings:
        return True
    registry = load_registry(settings.models_file)
    entry = registry.models.get(settings.primary_model() or registry.default)
    return entry is not None and entry.embedding


def _embedder(settings: Settings, backend: LlamaBackend, report: dict[str, Any]) -> LlamaEmbedder:
    """The embedding context on the loaded model: one decode's worth of tokens (the chat step's n_batch), the
    chat context's prefill threads. A failure unloads the model before it propagates."""
    config = backend.config
    try:
        embedder = LlamaEmbedder(
            backend,
            EmbedderConfig(
                pooling=settings.pooling,
                n_batch=backend.info.n_batch,
                n_threads=config.n_threads_batch or config.n_threads,
            ),
        )
    except BaseException:
        backend.close()
        raise
    report["embeddings"] = asdict(embedder.info)
    return embedder


def _load_with_plan(
    settings: Settings,
    model: ResolvedModel,
    verdict: ProbeVerdict,
    served_name: str,
    report: dict[str, Any],
    planned: Plan | None = None,
) -> tuple[LlamaBackend, Plan]:
    shape = read_model_shape(model.path)
    with_gpus = supports_gpu_offload()
    # llama.cpp's own registry names the GPUs it will use, in its order, with free memory as CUDA sees it
    devices = list_devices() if with_gpus else None
    hardware = detect(cache_path=settings.cache_dir / "hardware.json", with_gpus=with_gpus, backend_devices=devices)
    request = PlanRequest(ctx=settings.ctx_size, parallel=settings.parallel, model_name=served_name)
    offload_plan = planned if planned is not None else plan(shape, hardware, request)
    report["plan_scope"] = "joint" if planned is not None else "alone"
    for attempt in range(OOM_RETRIES + 1):
        log.info("offload plan:\n%s", render_table(offload_plan, shape))
        # the MTP block (--spec-type mtp) is one more layer than the plan counts: ~2% of Qwen3-Next-80B
        config = replace(offload_backend_config(offload_plan, verdict), load_mtp=settings.spec_type == "mtp")
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
        return backend, offload_plan
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
