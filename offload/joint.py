"""One memory plan for several models in one server: every member's layers and experts placed together.

`plan_joint(members, hardware)` shares each device's budget (a GPU's free memory less its margin; the RAM
left after the RAM margin) between the members. It is built on the single-model planner, not beside it:

1. Each member is planned alone on the whole machine (`plan()`): a member that does not fit even then can
   never fit. Its context, KV cache type and batch sizes are then kept for the joint plan (pinned): sharing
   a GPU moves layers and experts, it never shortens a context or quantizes a cache.
2. Each member's *curve*: its plan for a shrinking share of the GPUs, computed lazily from the top (the share
   it would use alone) downwards, one step at a time: each step is the plan for one byte less than the last
   plan used (one expert layer or one layer fewer). A point is (GPU share it needs, RAM it needs, score).
3. Allocation over the curves: while the members' shares exceed the GPUs, the member that loses the least
   priority-weighted time per output token per byte freed steps down; then, while any member's higher point
   fits in what is left, the one gaining the most weighted time per byte steps up. A member's loss is
   weight x (1/score_after - 1/score_before): with weights proportional to each model's share of the traffic,
   this minimises the expected seconds per output token (the planner's score counts prompt and output).
   The loop ends only when no member's next layer / expert group fits in what is left.
4. What is left of each device is split between the members in proportion to their weights (RAM left is the
   prompt caches' room), and each member is planned once more on exactly its share, with `plan()`: each
   member's `Plan` is what the single-model loader loads, and within its share by construction.

Members are admitted in order: a member that does not fit beside the ones before it is reported (with why)
and left out, so list the loaded models first. A member with `current` set keeps that plan (a model already
loaded): its memory is taken as it is and only the others are placed around it. One member planned alone on
the whole machine gets exactly `plan()`'s answer.

Approximations: each member's plan counts its own CUDA runtime (512 MiB per GPU) and host process overhead,
although models in one process share the CUDA context and the process; that only errs on the safe side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from fractions import Fraction
from typing import Any

from offload.gguf_shape import ModelShape
from offload.hardware import GIB, MIB, HardwareProfile
from offload.planner import (
    ComputeCache,
    DoesNotFitError,
    Plan,
    PlanError,
    PlanRequest,
    gpu_margin,
    plan,
    ram_margin,
)

CPU = "CPU"


@dataclass(frozen=True)
class JointMember:
    """One model of a joint plan: what `plan()` takes, plus its GPU priority."""

    shape: ModelShape
    request: PlanRequest = field(default_factory=PlanRequest)
    weight: float = 1.0  # GPU priority: e.g. its share of the traffic; only ratios between members matter
    current: Plan | None = None  # already loaded with this plan: it is kept, and the others fit around it

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise PlanError(f"the GPU priority weight of {self.name} must be a positive number, got {self.weight}")

    @property
    def name(self) -> str:
        return self.request.model_name or self.shape.name


@dataclass(frozen=True)
class MemberPlan:
    name: str
    weight: float
    plan: Plan  # what the single-model loader loads (placement_for(plan))
    kept: bool  # True: its `current` plan, unchanged

    def bytes_on(self, device: str) -> int:
        """What it takes on `device`: llama.cpp's buffers, and on the host also the RAM its prompt snapshots
        and prompt cache may take."""
        used = next((d.total_bytes for d in self.plan.devices if d.name == device), 0)
        return used + (self.reserved_ram_bytes if device == CPU else 0)

    @property
    def reserved_ram_bytes(self) -> int:
        return self.plan.state_snapshot_bytes + self.plan.prompt_cache_bytes

    @property
    def gpu_bytes(self) -> int:
        return sum(d.total_bytes for d in self.plan.devices if d.kind == "gpu")


@dataclass(frozen=True)
class JointDevice:
    name: str
    kind: str
    budget_bytes: int  # the whole device's: free memory less the (largest member's) margin
    used_bytes: int  # the sum of the members' bytes_on(name)

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes


@dataclass(frozen=True)
class MemberProblem:
    name: str
    reason: str
    never_fits: bool  # True: it does not fit even alone on the whole machine


@dataclass(frozen=True)
class JointPlan:
    members: tuple[MemberPlan, ...]  # the members that fit, in the order given
    devices: tuple[JointDevice, ...]  # GPUs then the host, with the members' sums
    problems: tuple[MemberProblem, ...]  # the members left out, and why

    @property
    def fits(self) -> bool:
        return not self.problems

    def member(self, name: str) -> MemberPlan:
        return next(m for m in self.members if m.name == name)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": 1,
            "fits": self.fits,
            "devices": [
                {
                    "name": d.name,
                    "kind": d.kind,
                    "budget_bytes": d.budget_bytes,
                    "used_bytes": d.used_bytes,
                    "free_bytes": d.free_bytes,
                    "members": {m.name: m.bytes_on(d.name) for m in self.members},
                }
                for d in self.devices
            ],
            "members": [
                {
                    "name": m.name,
                    "weight": m.weight,
                    "kept": m.kept,
                    "bytes_per_device": {d.name: m.bytes_on(d.name) for d in self.devices},
                    "plan": m.plan.to_json(),
                }
                for m in self.members
            ],
            "problems": [{"name": p.name, "reason": p.reason, "never_fits": p.never_fits} for p in self.problems],
        }


# ---------------------------------------------------------------------------------------------------------
# Budgets and member hardware


@dataclass(frozen=True)
class _Budgets:
    """What the placed members share: per GPU and of RAM, after the margins and the kept members."""

    gpus: tuple[int, ...]
    ram: int

    def gpu_shares(self, level: Fraction) -> tuple[int, ...]:
        """A member at `level` (0..1) gets that fraction of every GPU, rounded down."""
        return tuple(math.floor(level * budget) for budget in self.gpus)

    def level_of(self, result: Plan) -> Fraction:
        """The smallest level whose shares hold what `result` uses on every GPU."""
        used = _gpu_used(result, len(self.gpus))
        levels = [Fraction(u, b) for u, b in zip(used, self.gpus, strict=True) if u > 0 and b > 0]
        return max(levels, default=Fraction(0))


def _gpu_used(result: Plan, n_gpus: int) -> tuple[int, ...]:
    """Bytes the plan takes on each of the machine's GPUs (a plan that fell back to the CPU lists none)."""
    by_name = {d.name: d.total_bytes for d in result.devices if d.kind == "gpu"}
    return tuple(by_name.get(f"CUDA{i}", 0) for i in range(n_gpus))


def _ram_need(result: Plan) -> int:
    """Host RAM a member cannot do without: llama.cpp's host buffers plus its prompt snapshots."""
    return result.device(CPU).total_bytes + result.state_snapshot_bytes


def _member_hardware(
    hardware: HardwareProfile, request: PlanRequest, gpu_shares: Sequence[int], ram_share: int
) -> HardwareProfile:
    """The machine as one member sees it: free memory such that plan()'s budgets are exactly its shares."""
    gpus = tuple(
        replace(gpu, free_bytes=max(share, 0) + gpu_margin(gpu.total_bytes, request))
        for gpu, share in zip(hardware.gpus, gpu_shares, strict=True)
    )
    return replace(hardware, gpus=gpus, ram_available_bytes=max(ram_share, 0) + ram_margin(hardware.ram_total_bytes))


def _pinned(request: PlanRequest, alone: Plan) -> PlanRequest:
    """The request with the settings its solo plan chose, so that a smaller share only moves weights."""
    return replace(request, ctx=alone.ctx, kv_type=alone.kv_type, n_ubatch=alone.n_ubatch, n_batch=alone.n_batch)


# ---------------------------------------------------------------------------------------------------------
# Curves


@dataclass(frozen=True)
class _Point:
    level: Fraction  # share of every GPU it needs
    ram: int  # host RAM it needs
    score: float  # plan()'s score: output tokens/s of the member's workload


class _Curve:
    """A member's plans for shrinking GPU shares, computed on demand from the top down."""

    def __init__(self, member: JointMember, hardware: HardwareProfile, budgets: _Budgets, alone: Plan) -> None:
        self.member = member
        self.hardware = hardware
        self.budgets = budgets
        self.request = _pinned(member.request, alone)
        self.cache: ComputeCache = {}
        self.points: list[_Point] = []
        self.exhausted = False
        self.top_error: str | None = None
        top = self._point_at(Fraction(1))
        if top is None:
            self.exhausted = True
        else:
            self.points.append(top)

    def plan_at(self, level: Fraction, ram_share: int, request: PlanRequest | None = None) -> Plan:
        shares = self.budgets.gpu_shares(level)
        member_hardware = _member_hardware(self.hardware, self.member.request, shares, ram_share)
        return plan(self.member.shape, member_hardware, request or self.request, compute_cache=self.cache)

    def _point_at(self, level: Fraction) -> _Point | None:
        try:
            result = self.plan_at(level, self.budgets.ram)
        except DoesNotFitError as exc:
            if not self.points:
                self.top_error = str(exc)
            return None
        return _Point(self.budgets.level_of(result), _ram_need(result), result.score)

    def _next_point(self) -> _Point | None:
        """The plan for one byte less than the lowest point so far uses. plan() is not monotone in its budget
        (shedding an expert layer to make room for a compute buffer can drop two where a swap would do), so a
        drop of more than a byte is probed once more half way, where the point is often better."""
        last = self.points[-1]
        if last.level == 0:
            return None
        step = Fraction(1, max(b for b in self.budgets.gpus if b > 0))
        lower = self._point_at(last.level - step)
        if lower is None or lower.level >= last.level:
            return None
        if lower.level < last.level - step:
            middle = self._point_at((lower.level + last.level) / 2)
            if middle is not None and lower.level < middle.level < last.level:
                return middle
        return lower

    def top_up(self, index: int, room: Fraction, ram_room: int) -> bool:
        """Whether the plan for the index-th point's share plus `room` is a better point that the sweep missed
        (plan() is not monotone in its budget); if so it is inserted above, at `index`."""
        current = self.points[index]
        higher = self._point_at(current.level + room)
        ceiling = self.points[index - 1].level if index > 0 else Fraction(2)
        if higher is None or not current.level < higher.level < ceiling or higher.score <= current.score:
            return False
        if higher.ram - current.ram > ram_room:
            return False
        self.points.insert(index, higher)
        return True

    def point(self, index: int) -> _Point | None:
        """The index-th point from the top (0: the most GPU); None below the bottom."""
        while index >= len(self.points) and not self.exhausted:
            lower = self._next_point()
            if lower is None:
                self.exhausted = True
            else:
                self.points.append(lower)
        return self.points[index] if index < len(self.points) else None


# ---------------------------------------------------------------------------------------------------------
# Allocation


@dataclass
class _Allocation:
    """Mutable only inside one allocation run: where each member stands on its curve."""

    curves: list[_Curve]
    positions: list[int]

    def level(self) -> Fraction:
        return sum((self.current(i).level for i in range(len(self.curves))), Fraction(0))

    def current(self, i: int) -> _Point:
        point = self.curves[i].point(self.positions[i])
        assert point is not None  # positions only ever move to existing points
        return point

    def ram(self) -> int:
        return sum(self.current(i).ram for i in range(len(self.curves)))


def _time_per_token(weight: float, score: float) -> float:
    return weight / score if score > 0 else math.inf


def _step_down(allocation: _Allocation) -> bool:
    """Move the member that loses least weighted time per GPU byte freed one point down; False if none can."""
    best: tuple[float, int] | None = None
    for i, curve in enumerate(allocation.curves):
        current, lower = allocation.current(i), curve.point(allocation.positions[i] + 1)
        if lower is None:
            continue
        weight = curve.member.weight
        loss = _time_per_token(weight, lower.score) - _time_per_token(weight, current.score)
        cost = loss / float(current.level - lower.level)
        if best is None or cost < best[0]:
            best = (cost, i)
    if best is None:
        return False
    allocation.positions[best[1]] += 1
    return True


def _step_up(allocation: _Allocation, ram_budget: int) -> bool:
    """Move a member to the higher point that gains most weighted time per GPU byte and fits what is left."""
    room = 1 - allocation.level()
    ram_room = ram_budget - allocation.ram()
    best: tuple[float, int, int] | None = None
    for i, curve in enumerate(allocation.curves):
        current = allocation.current(i)
        for index in range(allocation.positions[i]):
            higher = curve.points[index]
            extra = higher.level - current.level
            if extra > room or higher.score <= current.score or higher.ram - current.ram > max(ram_room, 0):
                continue
            weight = curve.member.weight
            gain = _time_per_token(weight, current.score) - _time_per_token(weight, higher.score)
            value = gain / float(extra) if extra > 0 else math.inf
            if best is None or value > best[0]:
                best = (value, i, index)
    if best is None:
        return False
    allocation.positions[best[1]] = best[2]
    return True


def _top_up(allocation: _Allocation, ram_budget: int) -> None:
    """Offer what is left to each member in turn, highest weight first: a plan for its share plus all of it
    that the curve's sweep did not meet, and then whatever step-ups that makes possible."""
    order = sorted(range(len(allocation.curves)), key=lambda i: -allocation.curves[i].member.weight)
    for i in order:
        room = 1 - allocation.level()
        if room <= 0:
            return
        if allocation.curves[i].top_up(allocation.positions[i], room, ram_budget - allocation.ram()):
            while _step_up(allocation, ram_budget):
                pass


def _allocate(curves: list[_Curve], ram_budget: int) -> tuple[_Allocation, str | None]:
    """Positions on the curves that fit the GPUs and RAM, or the reason none do."""
    allocation = _Allocation(curves, [0] * len(curves))
    while allocation.level() > 1:
        if not _step_down(allocation):
            short = float(allocation.level() - 1)
            return allocation, f"the GPUs are short even with every model's smallest share ({short:.0%} of them)"
    while _step_up(allocation, ram_budget):
        pass
    _top_up(allocation, ram_budget)
    if allocation.ram() > ram_budget:
        return allocation, f"RAM: they need {_gib(allocation.ram())}, {_gib(ram_budget)} is available"
    return allocation, None


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.2f} GiB" if abs(n_bytes) >= GIB else f"{n_bytes / MIB:.0f} MiB"


# ---------------------------------------------------------------------------------------------------------
# The public entry points


class JointPlanner:
    """Plans several models on one machine. Keeps each member's solo plan and curve, so that re-planning with
    other members (the eviction helper tries several sets) does not redo them. Owned by its caller."""

    def __init__(self, hardware: HardwareProfile) -> None:
        self.hardware = hardware
        self._alone: dict[tuple[Any, ...], Plan | DoesNotFitError] = {}
        self._curves: dict[tuple[Any, ...], _Curve] = {}

    def alone(self, member: JointMember) -> Plan | DoesNotFitError:
        """plan() on the whole machine, or why it does not fit even so (PlanError for a bad request)."""
        key = _member_key(member)
        if key not in self._alone:
            try:
                self._alone[key] = plan(member.shape, self.hardware, member.request)
            except DoesNotFitError as exc:
                self._alone[key] = exc
        return self._alone[key]

    def plan(self, members: Sequence[JointMember]) -> JointPlan:
        names = [m.name for m in members]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise PlanError(f"two members share the name {duplicates[0]!r}: give each model its own model_name")
        kept = [m for m in members if m.current is not None]
        budgets = self._budgets(members, kept)
        admitted: list[tuple[JointMember, _Curve]] = []
        problems: list[MemberProblem] = []
        for member in members:
            if member.current is not None:
                continue
            problem = self._admit(member, admitted, budgets)
            if problem is not None:
                problems.append(problem)
        placed = self._final_plans(admitted, budgets)
        results = [MemberPlan(m.name, m.weight, m.current, kept=True) for m in kept if m.current is not None]
        results += placed
        order = {name: i for i, name in enumerate(names)}
        results.sort(key=lambda r: order[r.name])
        return JointPlan(tuple(results), self._devices(members, results), tuple(problems))

    # -- budgets ---------------------------------------------------------------------------------------------
    def _margins(self, members: Sequence[JointMember]) -> tuple[int, ...]:
        requests = [m.request for m in members] or [PlanRequest()]
        return tuple(max(gpu_margin(gpu.total_bytes, r) for r in requests) for gpu in self.hardware.gpus)

    def _device_budgets(self, members: Sequence[JointMember]) -> tuple[tuple[int, ...], int]:
        gpus = tuple(
            gpu.free_bytes - margin for gpu, margin in zip(self.hardware.gpus, self._margins(members), strict=True)
        )
        ram = self.hardware.ram_available_bytes - ram_margin(self.hardware.ram_total_bytes)
        return gpus, ram

    def _budgets(self, members: Sequence[JointMember], kept: Sequence[JointMember]) -> _Budgets:
        gpus, ram = self._device_budgets(members)
        kept_plans = [MemberPlan(m.name, m.weight, m.current, kept=True) for m in kept if m.current is not None]
        gpus = tuple(max(0, budget - sum(k.bytes_on(f"CUDA{i}") for k in kept_plans)) for i, budget in enumerate(gpus))
        return _Budgets(gpus, max(0, ram - sum(k.bytes_on(CPU) for k in kept_plans)))

    def _devices(self, members: Sequence[JointMember], results: Sequence[MemberPlan]) -> tuple[JointDevice, ...]:
        gpus, ram = self._device_budgets(members)
        names = [(f"CUDA{i}", "gpu", budget) for i, budget in enumerate(gpus)] + [(CPU, "cpu", ram)]
        return tuple(
            JointDevice(name, kind, budget, sum(r.bytes_on(name) for r in results)) for name, kind, budget in names
        )

    # -- admission -------------------------------------------------------------------------------------------
    def _curve(self, member: JointMember, budgets: _Budgets, alone: Plan) -> _Curve:
        key = (_member_key(member), budgets)
        if key not in self._curves:
            self._curves[key] = _Curve(member, self.hardware, budgets, alone)
        return self._curves[key]

    def _admit(
        self, member: JointMember, admitted: list[tuple[JointMember, _Curve]], budgets: _Budgets
    ) -> MemberProblem | None:
        alone = self.alone(member)
        if isinstance(alone, DoesNotFitError):
            return MemberProblem(member.name, f"does not fit even alone: {alone}", never_fits=True)
        curve = self._curve(member, budgets, alone)
        others = ", ".join(m.name for m, _ in admitted) or "the loaded models"
        if curve.top_error is not None:
            return MemberProblem(member.name, f"does not fit beside {others}: {curve.top_error}", never_fits=False)
        _, reason = _allocate([c for _, c in admitted] + [curve], budgets.ram)
        if reason is not None:
            return MemberProblem(member.name, f"does not fit beside {others}: {reason}", never_fits=False)
        admitted.append((member, curve))
        return None

    def _final_plans(self, admitted: list[tuple[JointMember, _Curve]], budgets: _Budgets) -> list[MemberPlan]:
        """Each member planned on its share: its curve position plus its weight's part of what is left (the
        last member takes the rounding remainders, so that the shares add up to the whole budgets)."""
        if not admitted:
            return []
        allocation, reason = _allocate([c for _, c in admitted], budgets.ram)
        assert reason is None  # every admitted set was checked
        total_weight = sum(m.weight for m, _ in admitted)
        gpu_left = 1 - allocation.level()
        ram_left = budgets.ram - allocation.ram()
        levels: list[Fraction] = []
        ram_shares: list[int] = []
        for i, (member, _) in enumerate(admitted[:-1]):
            part = member.weight / total_weight
            levels.append(allocation.current(i).level + gpu_left * Fraction(part))
            ram_shares.append(allocation.current(i).ram + int(ram_left * part))
        levels.append(1 - sum(levels, Fraction(0)))
        ram_shares.append(budgets.ram - sum(ram_shares))
        return [
            self._final_plan(member, curve, allocation.current(i), level, ram_share)
            for i, ((member, curve), level, ram_share) in enumerate(zip(admitted, levels, ram_shares, strict=True))
        ]

    def _final_plan(
        self, member: JointMember, curve: _Curve, point: _Point, level: Fraction, ram_share: int
    ) -> MemberPlan:
        shares = curve.budgets.gpu_shares(level)
        member_hardware = _member_hardware(self.hardware, member.request, shares, ram_share)
        if member_hardware == self.hardware:
            # the whole machine: exactly the solo plan (settings chosen freely, as plan() does)
            alone = self.alone(member)
            assert isinstance(alone, Plan)
            return MemberPlan(member.name, member.weight, alone, kept=False)
        try:
            result: Plan | None = curve.plan_at(level, ram_share)
        except DoesNotFitError:
            result = None  # a larger GPU share that the planner used differently, needing more RAM
        if result is None or result.score < point.score:
            # plan() is not monotone in its budget: the larger share fell into a gap, the point's own does not
            at_point = curve.plan_at(point.level, ram_share)
            if result is None or at_point.score > result.score:
                result, shares = at_point, curve.budgets.gpu_shares(point.level)
        note = (
            f"joint plan: a share of {_gib(sum(shares))} of GPU memory and {_gib(ram_share)} of RAM, "
            f"GPU priority weight {member.weight:g}; context, KV cache type and batch sizes as planned alone"
        )
        alone = self.alone(member)
        kept_notes = tuple(t for t in alone.tradeoffs if t.startswith("context cut")) if isinstance(alone, Plan) else ()
        return MemberPlan(
            member.name, member.weight, replace(result, tradeoffs=(*kept_notes, note, *result.tradeoffs)), False
        )


def _member_key(member: JointMember) -> tuple[Any, ...]:
    shape = member.shape
    return (shape.path, shape.total_bytes, shape.name, member.request)


def plan_joint(members: Sequence[JointMember], hardware: HardwareProfile) -> JointPlan:
    """Place every member's layers and experts on `hardware` together; see the module docstring."""
    return JointPlanner(hardware).plan(members)


# ---------------------------------------------------------------------------------------------------------
# Eviction (for the server: which idle models to unload so that another one fits)


class LoadVerdict(StrEnum):
    FITS = "fits"  # load it beside the others as they are
    EVICT = "evict"  # unload `evict` (least recently used first), then load it
    CANNOT_FIT_NOW = "cannot_fit_now"  # evicting every idle model is not enough: wait, or 503
    NEVER_FITS = "never_fits"  # it does not fit even alone on this machine


@dataclass(frozen=True)
class LoadedModel:
    member: JointMember  # with `current` set to the plan it was loaded with, to keep it as it is
    last_used: float  # any clock, larger is more recent
    idle: bool  # no request running or waiting: it may be evicted


@dataclass(frozen=True)
class LoadDecision:
    verdict: LoadVerdict
    evict: tuple[str, ...]  # names to unload, least recently used first (empty unless EVICT)
    plan: JointPlan  # the joint plan after the evictions (FITS / EVICT), or the last one tried
    reason: str


def plan_load(
    loaded: Sequence[LoadedModel],
    new: JointMember,
    hardware: HardwareProfile,
    planner: JointPlanner | None = None,
) -> LoadDecision:
    """Which idle models to evict, least recently used first, so that `new` fits beside the rest."""
    planner = planner or JointPlanner(hardware)
    alone = planner.plan([new])
    if not alone.fits:
        return LoadDecision(LoadVerdict.NEVER_FITS, (), alone, alone.problems[0].reason)
    remaining = list(loaded)
    evicted: list[str] = []
    candidates = sorted((m for m in loaded if m.idle), key=lambda m: m.last_used)
    while True:
        joint = planner.plan([m.member for m in remaining] + [new])
        if joint.fits:
            verdict = LoadVerdict.EVICT if evicted else LoadVerdict.FITS
            reason = f"evict {', '.join(evicted)} to make room" if evicted else "fits beside the loaded models"
            return LoadDecision(verdict, tuple(evicted), joint, reason)
        if not candidates:
            busy = ", ".join(m.member.name for m in remaining) or "nothing"
            reason = f"{joint.problems[0].reason}; no idle model is left to evict (busy: {busy})"
            return LoadDecision(LoadVerdict.CANNOT_FIT_NOW, (), joint, reason)
        victim = candidates.pop(0)
        remaining.remove(victim)
        evicted.append(victim.member.name)
