"""Whether a model may load beside the loaded ones: load (evicting some idle ones first), wait, or never.

The fleet asks `Admission.decide(model, loaded)` before each load. `MemoryBudget` is the simple answer: every
model's predicted bytes (its GGUF file plus its KV cache at its slots × context, from the GGUF header) against one
budget; a model that does not fit beside the loaded ones evicts idle models, least recently used (then lowest
priority) first, as Ollama does; when the idle ones are not enough the request waits. `JointAdmission` answers
with offload/joint.py's one memory plan for all loaded models instead (the app uses it with --auto-offload)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Protocol

import psutil

from offload.gguf_shape import GgufError, KvType, read_model_shape
from offload.hardware import HardwareProfile
from offload.joint import JointMember, JointPlanner, LoadedModel, LoadVerdict, plan_load
from offload.planner import Plan, PlanRequest, ram_margin
from server.fleet.spec import ModelSpec

log = logging.getLogger(__name__)

MIB = 1 << 20


@dataclass(frozen=True)
class Resident:
    """A model that holds memory now (loaded, loading or unloading)."""

    id: str
    bytes: int
    idle: bool  # loaded with no request in flight: may be evicted
    last_used: float  # the fleet's clock at its last request's end
    priority: int = 0


@dataclass(frozen=True)
class Decision:
    kind: Literal["load", "wait", "never"]
    evict: tuple[str, ...] = ()  # ids to unload first (kind "load")
    reason: str = ""
    # kind "load" under a joint plan: the model's own share of it (what the loader places it with instead of
    # planning it alone on the whole machine); None: the loader plans alone, as for one model
    plan: Plan | None = None


class Admission(Protocol):
    def decide(self, model: ModelSpec, loaded: Sequence[Resident]) -> Decision: ...

    def predicted_bytes(self, model: ModelSpec) -> int: ...


def predicted_model_bytes(model: ModelSpec) -> int:
    """The GGUF file plus its f16 KV cache for every slot at its context (what a CPU load takes); the file alone
    for a model not on disk yet or that the header reader cannot read."""
    from registry.models import RegistryError, load_registry, resolve_model

    settings = model.settings
    try:
        path = Path(resolve_model(settings.primary_model() or "", load_registry(settings.models_file)).path)
        size = path.stat().st_size
    except (RegistryError, OSError) as exc:
        log.debug("cannot size %s yet: %s", model.id, exc)
        return 0
    try:
        shape = read_model_shape(path)
    except GgufError:
        return size
    ctx = settings.ctx_size or min(shape.n_ctx_train or 4096, 8192)
    return size + shape.kv_bytes_per_token(KvType.F16) * ctx * settings.parallel


def default_budget_bytes() -> int:
    """RAM less the planner's margin (what one model's plan may use), plus every GPU's memory when llama.cpp
    offloads to one."""
    total = psutil.virtual_memory().total
    budget = total - ram_margin(total)
    try:
        from bindings.devices import list_devices
        from bindings.llama_backend import supports_gpu_offload

        if supports_gpu_offload():
            budget += sum(device.free_bytes for device in list_devices())
    except Exception as exc:  # no GPU library, no device: RAM alone
        log.debug("no GPU memory counted in the fleet's budget: %s", exc)
    return budget


class MemoryBudget:
    """Admission by predicted bytes against one budget; `size_of` is injectable (tests use fixed sizes)."""

    def __init__(self, budget_bytes: int, size_of: Callable[[ModelSpec], int] = predicted_model_bytes) -> None:
        self.budget_bytes = budget_bytes
        self._size_of = size_of
        self._sizes: dict[str, int] = {}

    def predicted_bytes(self, model: ModelSpec) -> int:
        if model.id not in self._sizes:
            self._sizes[model.id] = self._size_of(model)
        return self._sizes[model.id]

    def decide(self, model: ModelSpec, loaded: Sequence[Resident]) -> Decision:
        need = self.predicted_bytes(model)
        if need > self.budget_bytes:
            return Decision(
                "never",
                reason=f"model {model.id} needs about {need / MIB:.0f} MiB, more than the whole budget of "
                f"{self.budget_bytes / MIB:.0f} MiB (--memory-budget-mib)",
            )
        free = self.budget_bytes - sum(resident.bytes for resident in loaded)
        evict: list[str] = []
        for resident in sorted((r for r in loaded if r.idle), key=lambda r: (r.priority, r.last_used)):
            if need <= free:
                break
            evict.append(resident.id)
            free += resident.bytes
        if need <= free:
            return Decision("load", evict=tuple(evict))
        return Decision(
            "wait",
            reason=f"model {model.id} needs about {need / MIB:.0f} MiB and the models in use leave "
            f"{free / MIB:.0f} MiB of the {self.budget_bytes / MIB:.0f} MiB budget",
        )


# offload/joint.py's verdicts as the fleet's decisions
_JOINT_KIND: dict[LoadVerdict, Literal["load", "wait", "never"]] = {
    LoadVerdict.FITS: "load",
    LoadVerdict.EVICT: "load",
    LoadVerdict.CANNOT_FIT_NOW: "wait",
    LoadVerdict.NEVER_FITS: "never",
}


def joint_member(model: ModelSpec) -> JointMember | None:
    """The model as a member of a joint plan (its GGUF's shape, slots, context; GPU weight 2^priority); None when
    its GGUF is not on disk yet or the header reader cannot read it."""
    from registry.models import RegistryError, load_registry, resolve_model

    settings = model.settings
    try:
        path = Path(resolve_model(settings.primary_model() or "", load_registry(settings.models_file)).path)
        shape = read_model_shape(path)
    except (RegistryError, OSError, GgufError) as exc:
        log.debug("no joint plan member for %s: %s", model.id, exc)
        return None
    request = PlanRequest(ctx=settings.ctx_size, parallel=settings.parallel, model_name=model.id)
    return JointMember(shape, request, weight=2.0**model.priority)


class JointAdmission:
    """Admission by one memory plan for all loaded models (offload/joint.py's `plan_load`: every member's layers
    and experts placed across the GPUs and RAM together; evicting idle models least recently used first). A model
    the joint planner cannot describe (its GGUF not downloaded yet, a header it cannot read) falls back to
    `fallback`'s byte count."""

    def __init__(
        self,
        hardware: HardwareProfile,
        fallback: MemoryBudget,
        member_of: Callable[[ModelSpec], JointMember | None] = joint_member,
    ) -> None:
        self._hardware = hardware
        self._planner = JointPlanner(hardware)
        self._fallback = fallback
        self._member_of = member_of
        self._members: dict[str, JointMember | None] = {}
        self._specs: dict[str, ModelSpec] = {}
        # The share of the joint plan each model was last admitted with: a loaded model keeps it (it is placed
        # already), and the others are planned around it
        self._placed: dict[str, Plan] = {}

    def predicted_bytes(self, model: ModelSpec) -> int:
        self._specs[model.id] = model
        return self._fallback.predicted_bytes(model)

    def _member(self, model: ModelSpec) -> JointMember | None:
        self._specs[model.id] = model
        if model.id not in self._members:
            self._members[model.id] = self._member_of(model)
        return self._members[model.id]

    def decide(self, model: ModelSpec, loaded: Sequence[Resident]) -> Decision:
        new = self._member(model)
        members = [self._member(self._specs[resident.id]) for resident in loaded if resident.id in self._specs]
        if new is None or len(members) != len(loaded) or any(member is None for member in members):
            return self._fallback.decide(model, loaded)
        state = [
            LoadedModel(replace(member, current=self._placed.get(resident.id)), resident.last_used, resident.idle)
            for member, resident in zip(members, loaded, strict=True)
            if member is not None
        ]
        decision = plan_load(state, new, self._hardware, self._planner)
        kind = _JOINT_KIND[decision.verdict]
        if kind != "load":
            return Decision(kind, reason=decision.reason)
        share = decision.plan.member(new.name).plan
        self._placed[model.id] = share
        return Decision(kind, evict=decision.evict, reason=decision.reason, plan=share)
