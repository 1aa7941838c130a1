"""The scheduler: plain Python, no llama.cpp. It decides, each step, which tokens of which slots go into the
one batch, and keeps the books on what every slot's memory holds.

A prefill chunk and a decode token are the same thing here: tokens scheduled for a slot at given positions.
Decode tokens of running slots go first (one each), then prompt chunks of prefilling slots fill the rest of
the token budget, oldest request first, so a long prompt never stalls running streams. Entries are ordered by
slot index, and a new request takes the free slot with the longest reusable prefix, else the lowest free one:
llama.cpp keeps a batch as one pass only when its sequence ids ascend (see the facts notes: −33% otherwise).

The prompt cache keeps past slot states in RAM, bounded in bytes and evicted least recently used first. An
entry's size is what the backend says the slot's state takes (`state_size`, asked just before the stash). A
stash copies the whole state on the engine thread, so every running stream waits for it: a 32k-context
Qwen3-Next entry (843 MiB) takes ~400 ms, 4-10 decode steps of the 80B (bench/stash_cost.py). So slots are
stashed while the engine is idle (one per step, so a new request waits for one stash at most), and under load
a stash predicted to stall the running streams for more than one decode step is skipped and counted.

Prompt logprobs (a request with `prompt_logprobs` set) need the logits of every prompt position, and a reused
prefix has none: such a prompt is computed whole in the free slot that holds the least (its contents are
stashed first, as for any overwrite), never from a reused prefix or a prompt-cache entry. Its prefill chunks
carry the next prompt token of each position as logprob targets; with max_tokens 0 the request finishes when
its prefill does, without sampling.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from bindings.protocol import (
    BackendError,
    BatchEntry,
    CacheOp,
    Drafter,
    DraftRequest,
    SampledToken,
    TokenLogprob,
    Vocab,
)
from server.engine.request import FinishReason, Request
from server.engine.sequence import Sequence, SequenceStatus, Slot, StepEvent
from server.engine.speculation import SpeculationConfig, draft_pays


@dataclass(frozen=True)
class SchedulerConfig:
    n_slots: int
    n_ctx_per_slot: int
    max_batch_tokens: int  # at least n_slots, so every running slot can decode each step
    supports_partial_removal: bool = True
    prefix_reuse: bool = True
    snapshot_min_tokens: int = 16  # smallest state worth saving (prompt snapshots, prompt-cache entries)
    prompt_cache_bytes: int = 0  # RAM for states of past sequences kept for reuse by later requests (0: off)
    # What a stash costs before the engine has timed one (bench/stash_cost.py: 0.45-0.7 ms/MiB into a fresh
    # buffer on the 2-core development machine); the engine's measurements replace it.
    stash_seconds_per_mib: float = 0.6e-3
    speculation: SpeculationConfig | None = None  # None: never draft (also when the scheduler has no drafter)

    def __post_init__(self) -> None:
        if self.max_batch_tokens < self.n_slots:
            raise ValueError(f"max_batch_tokens ({self.max_batch_tokens}) must be >= n_slots ({self.n_slots})")
        if self.prompt_cache_bytes < 0:
            raise ValueError(f"prompt_cache_bytes must be >= 0, got {self.prompt_cache_bytes}")
        if self.stash_seconds_per_mib <= 0:
            raise ValueError(f"stash_seconds_per_mib must be > 0, got {self.stash_seconds_per_mib}")


@dataclass
class StepPlan:
    admitted: list[Sequence] = field(default_factory=list)  # sequences that need a sampler from now on
    ops: list[CacheOp] = field(default_factory=list)  # memory changes to apply before the decode
    entries: list[BatchEntry] = field(default_factory=list)  # the batch, slot-ascending
    entry_sequences: list[Sequence] = field(default_factory=list)  # who owns each entry
    samples: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, logits index) to sample
    # Speculative decoding: sequence id → the tokens drafted after its pending token (its entry ends with them
    # and has logits at each; samples' index is the pending token's). Empty when nobody drafted.
    drafts: dict[int, tuple[int, ...]] = field(default_factory=dict)
    # What one drafted token costs in this step, as a share of what the step spends per token it emits without
    # drafts: the measured share of a decode step, times the slots decoding in it (every one of them waits for
    # the verification, and each emits one token for the step's time).
    draft_cost: float = 0.0

    @property
    def n_tokens(self) -> int:
        return sum(len(entry.tokens) for entry in self.entries)

    @property
    def empty(self) -> bool:
        return not self.entries and not self.ops


@dataclass
class SchedulerCounters:
    n_prompt_tokens_computed: int = 0
    n_prompt_tokens_cached: int = 0
    n_generated_tokens: int = 0
    n_requests_finished: int = 0
    n_requests_failed: int = 0
    prompt_cache_bytes: int = 0  # bytes of the entries the prompt cache holds now
    prompt_cache_entries: int = 0  # entries it holds now
    n_prompt_cache_hits: int = 0  # requests whose prompt prefix was loaded from the prompt cache
    n_prompt_cache_misses: int = 0  # requests that found no prefix to reuse, in a slot or in the cache
    n_prompt_cache_evictions: int = 0  # entries dropped, least recently used first, to make room
    n_prompt_cache_stashes_skipped: int = 0  # slot states lost unsaved: larger than the cache, or too slow to copy
    n_draft_tokens: int = 0  # speculative decoding: tokens drafted and verified
    n_draft_accepted: int = 0  # of those, accepted (each saved a decode step)
    n_draft_failures: int = 0  # steps whose drafter raised (nothing was drafted then)


@dataclass(frozen=True)
class CacheEntry:
    entry_id: int  # the backend's name for it
    n_bytes: int  # what the backend reported the slot's state took when it was stashed


MIB = 1 << 20
# Under load, a stash may stall the running streams for at most this many decode steps.
MAX_STASH_STALL_STEPS = 1.0
# Stashes smaller than this say little about the copy rate of big ones: they reuse memory the allocator
# already holds, where a big one gets fresh pages (0.05 against 0.45 ms/MiB in bench/stash_cost.py).
MIN_TIMED_STASH_BYTES = 16 * MIB
COST_SMOOTHING = 0.3  # weight of a new measurement in the running estimates of stash and step times


def common_prefix_length(a: Iterable[int], b: Iterable[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        vocab: Vocab,
        state_size: Callable[[int], int] | None = None,
        drafter: Drafter | None = None,
    ) -> None:
        """`state_size(slot)`: bytes of a slot's state (Backend.state_size); needed when the prompt cache is on.
        `drafter`: proposes draft tokens for speculative decoding (with config.speculation)."""
        if config.prompt_cache_bytes and state_size is None:
            raise ValueError("a prompt cache (prompt_cache_bytes > 0) needs state_size to know what entries cost")
        self.config = config
        self._vocab = vocab
        self._state_size = state_size
        self.slots = [Slot(index=i) for i in range(config.n_slots)]
        self._waiting: deque[list[Sequence]] = deque()  # one entry per request: its choices
        self._requests: dict[str, list[Sequence]] = {}  # every unfinished request, waiting or running
        self._fork_sources: dict[int, int] = {}  # child slot → parent slot, copied at the next step
        self._slots_to_clear: set[int] = set()
        # The prompt cache: what slots held before new requests overwrote them, least recently used first.
        self._prompt_cache: OrderedDict[tuple[int, ...], CacheEntry] = OrderedDict()
        self._next_entry_id = 0
        # Entries the backend may still hold although the index forgot them (their step failed): dropped next step.
        self._pending_drops: set[int] = set()
        self._in_flight: StepPlan | None = None  # the plan schedule() returned and commit()/fail() has not seen
        self._streams_running = False  # a sequence held a slot when this step began: a stash would stall it
        self.stash_seconds_per_byte = config.stash_seconds_per_mib / MIB
        self.step_seconds: float | None = None  # a decode step's time, as the engine measures it
        self.counters = SchedulerCounters()
        self._drafter = drafter if config.speculation is not None else None
        # What drafting and verifying one token costs, as a share of a decode step (measured; 0 until then).
        self.draft_token_cost = 0.0
        self._draft_seconds = 0.0  # the drafter's time in the step being planned
        # Speculation: memory ops that cut rejected drafts out of slots, applied first thing next step.
        self._pending_rollbacks: dict[int, CacheOp] = {}

    # --- queries ---------------------------------------------------------------------------------
    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    @property
    def n_running(self) -> int:
        return len(self._requests) - len(self._waiting)

    @property
    def n_free_slots(self) -> int:
        return sum(1 for slot in self.slots if slot.free)

    @property
    def has_work(self) -> bool:
        return (
            bool(self._requests)
            or bool(self._slots_to_clear)
            or bool(self._pending_drops)
            or bool(self._pending_rollbacks)
        )

    def prompt_cache_entry_ids(self) -> set[int]:
        """The backend entries the prompt cache's index refers to."""
        return {entry.entry_id for entry in self._prompt_cache.values()}

    # --- cost model (fed by the engine's measurements) --------------------------------------------------
    def observe_stash(self, n_bytes: int, seconds: float) -> None:
        """A stash of n_bytes took `seconds` on the engine thread."""
        if n_bytes >= MIN_TIMED_STASH_BYTES:
            rate = seconds / n_bytes
            self.stash_seconds_per_byte += COST_SMOOTHING * (rate - self.stash_seconds_per_byte)

    def observe_step(self, seconds: float) -> None:
        """A decode step (one token per running slot, no prefill) took `seconds`."""
        previous = self.step_seconds
        self.step_seconds = seconds if previous is None else previous + COST_SMOOTHING * (seconds - previous)

    def observe_draft_step(self, seconds: float, n_drafted: int) -> None:
        """A step of decode tokens plus n_drafted verified draft tokens (no prefill) took `seconds` to decode:
        next to a plain decode step's time, plus the drafter's own time (a draft model's decodes), what one
        drafted token costs (SmolLM2 verifying on a CPU: half a step; a large memory-bound model: next to
        nothing)."""
        if self.step_seconds is None or n_drafted <= 0 or self.step_seconds <= 0:
            return
        extra = max(0.0, seconds - self.step_seconds) + self._draft_seconds
        cost = extra / n_drafted / self.step_seconds
        self.draft_token_cost += COST_SMOOTHING * (min(cost, 1.0) - self.draft_token_cost)

    def deadlines(self) -> list[float]:
        return [seqs[0].request.deadline for seqs in self._requests.values() if seqs[0].request.deadline]

    # --- intake ----------------------------------------------------------------------------------
    def add(self, choices: list[Sequence]) -> None:
        """Queue one request's choices (all share the request; choice 0 prefills for all of them)."""
        request = choices[0].request
        if len(choices) > self.config.n_slots:
            raise ValueError(f"request needs {len(choices)} slots, the context has {self.config.n_slots}")
        self._requests[request.request_id] = choices
        self._waiting.append(choices)

    def cancel(self, request_id: str) -> list[StepEvent]:
        return self._finish_request(request_id, FinishReason.CANCELLED, None)

    def expire(self, now: float) -> list[StepEvent]:
        """Fail every request whose deadline has passed."""
        expired = [rid for rid, seqs in self._requests.items() if _past_deadline(seqs[0].request, now)]
        events: list[StepEvent] = []
        for request_id in expired:
            events += self._finish_request(request_id, FinishReason.TIMEOUT, "request timed out")
        return events

    def fail_all(self, message: str) -> list[StepEvent]:
        """Fail every unfinished request and forget every slot's memory and the prompt cache (after an
        unexpected error, nothing the books say about the backend's memory can be trusted)."""
        events: list[StepEvent] = []
        for request_id in list(self._requests):
            events += self._finish_request(request_id, FinishReason.ERROR, message)
        for slot in self.slots:
            self._forget_slot(slot.index)
        if self._in_flight is not None:
            self._forget_plan_entries(self._in_flight)
            self._in_flight = None
        # Every entry the backend may hold is dropped at the next step, so none is orphaned there.
        self._pending_drops |= self.prompt_cache_entry_ids()
        for tokens in list(self._prompt_cache):
            self._cache_remove(tokens)
        return events

    # --- one step --------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        self._streams_running = any(not slot.free for slot in self.slots)
        self._plan_pending_memory_ops(plan)
        self._admit(plan)
        budget = self.config.max_batch_tokens
        budget -= self._plan_decodes(plan)
        if self._drafter is not None:
            budget -= self._plan_drafts(plan, budget)
        self._plan_prefills(plan, budget)
        self._order_batch(plan)
        if plan.empty and not self._requests:
            self._stash_an_idle_slot(plan)
        self._in_flight = plan
        return plan

    def commit(
        self,
        plan: StepPlan,
        sampled: Mapping[int, SampledToken | list[SampledToken]],
        prompt_logprobs: Mapping[int, tuple[TokenLogprob, ...]] | None = None,
    ) -> list[StepEvent]:
        """Record a decoded batch (or a step of memory ops only) and the tokens sampled from it; return what
        each sequence produced. `prompt_logprobs[seq_id]`: the logprobs of the logprob targets of that
        sequence's entry (Backend.prompt_logprobs). A speculating sequence's value is its verified run
        (speculation.verify_draft): one event carries all its emitted tokens."""
        self._in_flight = None
        events: list[StepEvent] = []
        for entry, seq in zip(plan.entries, plan.entry_sequences, strict=True):
            if entry.logprob_targets and prompt_logprobs is not None:
                seq.prompt_logprobs.extend(prompt_logprobs.get(seq.seq_id, ()))
            events += self._record_decoded(entry, seq)
        for seq, _ in plan.samples:
            value = sampled[seq.seq_id]
            if isinstance(value, SampledToken):
                events.append(self._accept(seq, value))
            else:
                events.append(self._accept_run(seq, value, plan.drafts.get(seq.seq_id, ()), plan.draft_cost))
        return events

    def fail(self, plan: StepPlan, message: str) -> list[StepEvent]:
        """The decode (or a memory op) of this plan failed: fail its requests, forget their slots' memory and
        the prompt-cache entries the plan stashed, loaded or dropped (the backend may hold them or not)."""
        self._in_flight = None
        affected = {seq.request.request_id for seq in plan.entry_sequences}
        affected |= {seq.request.request_id for seq, _ in plan.samples}
        affected |= {seq.request.request_id for seq in plan.admitted}
        slot_ops = [op for op in plan.ops if op.kind != "drop"]
        for op in slot_ops:
            owner = self.slots[op.slot].sequence
            if owner is not None:
                affected.add(owner.request.request_id)
        for entry in plan.entries:
            self._forget_slot(entry.slot)
        for op in slot_ops:
            self._forget_slot(op.slot)
        self._forget_plan_entries(plan)
        events: list[StepEvent] = []
        for request_id in affected:
            events += self._finish_request(request_id, FinishReason.ERROR, message)
        return events

    def _forget_plan_entries(self, plan: StepPlan) -> None:
        """A step failed somewhere in its ops or its decode: which of its stashes, loads and drops reached the
        backend is unknown. Its stashes and loads leave the index (a load that failed would fail again for
        every later request with that prefix, which then prefills cold instead) and, with its drops, are
        dropped again at the next step: dropping is idempotent, so the backend ends up holding exactly the
        entries the index knows."""
        touched = {op.entry for op in plan.ops if op.kind in ("stash", "load", "drop")}
        for tokens in [t for t, entry in self._prompt_cache.items() if entry.entry_id in touched]:
            self._cache_remove(tokens)
        self._pending_drops |= touched

    # --- planning helpers ------------------------------------------------------------------------
    def _plan_pending_memory_ops(self, plan: StepPlan) -> None:
        if self._pending_rollbacks:  # first: the books already say these slots hold only the accepted tokens
            plan.ops += [self._pending_rollbacks[index] for index in sorted(self._pending_rollbacks)]
            self._pending_rollbacks.clear()
        for entry_id in sorted(self._pending_drops):
            plan.ops.append(CacheOp("drop", 0, entry=entry_id))
        self._pending_drops.clear()
        for index in sorted(self._slots_to_clear):
            plan.ops.append(CacheOp("clear", index))
        self._slots_to_clear.clear()
        for slot in self.slots:
            if slot.needs_save:
                plan.ops.append(CacheOp("save", slot.index))
                slot.snapshot_tokens = tuple(slot.cached_tokens)
                slot.needs_save = False
        for child_index, parent_index in sorted(self._fork_sources.items()):
            plan.ops.append(CacheOp("copy", child_index, src=parent_index))
            self.slots[child_index].cached_tokens = list(self.slots[parent_index].cached_tokens)
        self._fork_sources.clear()

    def _admit(self, plan: StepPlan) -> None:
        """Admit waiting requests in arrival order while enough slots are free (no overtaking)."""
        while self._waiting and len(self._waiting[0]) <= self.n_free_slots:
            choices = self._waiting.popleft()
            parent = choices[0]
            if parent.wants_prompt_logprobs:
                parent_slot, n_reuse, op = self._emptiest_slot()
            else:
                parent_slot, n_reuse, op = self._choose_slot(parent.prompt)
            self._bind(parent, parent_slot, SequenceStatus.PREFILL)
            cached = None if parent.wants_prompt_logprobs else self._best_cache_entry(parent.prompt)
            if cached is not None and cached[1] > max(n_reuse, self.config.snapshot_min_tokens - 1):
                n_reuse = self._load_cache_entry(plan, parent_slot, *cached)
                self.counters.n_prompt_cache_hits += 1
            else:
                if n_reuse == 0 and self.config.prompt_cache_bytes and not parent.wants_prompt_logprobs:
                    self.counters.n_prompt_cache_misses += 1
                if n_reuse < len(parent_slot.cached_tokens):
                    self._stash(plan, parent_slot)  # about to lose what the slot holds: keep it in RAM
                if op is not None:
                    plan.ops.append(op)
                self._apply_reuse_bookkeeping(parent_slot, n_reuse, op)
            parent.n_prompt_done = parent.n_cached_tokens = n_reuse
            for child in choices[1:]:
                free = next(slot for slot in self.slots if slot.free)
                self._stash(plan, free)  # the fork will overwrite it
                self._bind(child, free, SequenceStatus.FORKING)
            plan.admitted += choices
            self.counters.n_prompt_tokens_cached += n_reuse

    def _choose_slot(self, prompt: tuple[int, ...]) -> tuple[Slot, int, CacheOp | None]:
        """The free slot whose memory saves the most prompt computation, and the op that prepares it."""
        best: tuple[Slot, int, CacheOp | None] | None = None
        for slot in self.slots:
            if not slot.free:
                continue
            n_reuse, op = self._reuse_plan(slot, prompt)
            if best is None or n_reuse > best[1]:
                best = (slot, n_reuse, op)
        assert best is not None, "_choose_slot called without a free slot"
        return best

    def _emptiest_slot(self) -> tuple[Slot, int, CacheOp | None]:
        """The free slot that holds the fewest tokens (computing a prompt whole there loses the least), and the
        op that empties it."""
        slot = min((slot for slot in self.slots if slot.free), key=lambda slot: len(slot.cached_tokens))
        return slot, 0, CacheOp("clear", slot.index) if slot.cached_tokens else None

    def _reuse_plan(self, slot: Slot, prompt: tuple[int, ...]) -> tuple[int, CacheOp | None]:
        """How many prompt tokens this slot already holds usably, and the memory op that gets it there.

        At least one prompt token is always recomputed: its logits give the first output token.
        """
        max_reuse = len(prompt) - 1
        clear = CacheOp("clear", slot.index) if slot.cached_tokens else None
        if not self.config.prefix_reuse:
            return 0, clear
        n_common = min(common_prefix_length(slot.cached_tokens, prompt), max_reuse)
        if self.config.supports_partial_removal:
            if n_common == len(slot.cached_tokens):
                return n_common, None
            return n_common, CacheOp("truncate", slot.index, n_keep=n_common) if n_common else clear
        # Recurrent state cannot be cut back: continue the slot as it is, or restore its snapshot.
        candidates: list[tuple[int, CacheOp | None]] = [(0, clear)]
        if slot.cached_tokens and n_common == len(slot.cached_tokens):
            candidates.append((n_common, None))
        snapshot = slot.snapshot_tokens
        if snapshot and len(snapshot) <= max_reuse and prompt[: len(snapshot)] == snapshot:
            candidates.append((len(snapshot), CacheOp("restore", slot.index)))
        return max(candidates, key=lambda candidate: candidate[0])

    def _best_cache_entry(self, prompt: tuple[int, ...]) -> tuple[tuple[int, ...], int] | None:
        """The prompt-cache entry that saves the most prompt computation, and how many tokens it saves."""
        max_reuse = len(prompt) - 1
        best: tuple[tuple[int, ...], int] | None = None
        for tokens in self._prompt_cache:
            if self.config.supports_partial_removal:
                n_reuse = min(common_prefix_length(tokens, prompt), max_reuse)
            else:  # a recurrent state is usable only whole: the entry must be a prefix of the prompt
                n_reuse = len(tokens) if len(tokens) <= max_reuse and prompt[: len(tokens)] == tokens else 0
            if n_reuse > 0 and (best is None or n_reuse > best[1]):
                best = (tokens, n_reuse)
        return best

    def _load_cache_entry(self, plan: StepPlan, slot: Slot, tokens: tuple[int, ...], n_reuse: int) -> int:
        """Fill `slot` from the prompt cache (keeping its old contents there first); return tokens reused."""
        entry = self._prompt_cache[tokens]
        self._prompt_cache.move_to_end(tokens)
        self._stash(plan, slot, keep=tokens)  # making room must not drop the very entry about to be loaded
        plan.ops.append(CacheOp("load", slot.index, entry=entry.entry_id))
        slot.cached_tokens = list(tokens)
        if n_reuse < len(tokens):  # only where partial removal works (see _best_cache_entry)
            plan.ops.append(CacheOp("truncate", slot.index, n_keep=n_reuse))
            del slot.cached_tokens[n_reuse:]
        return n_reuse

    def _stash(self, plan: StepPlan, slot: Slot, *, keep: tuple[int, ...] | None = None, idle: bool = False) -> bool:
        """Save what `slot` holds into the prompt cache before it is overwritten, first dropping least recently
        used entries (never `keep`) until it fits; True when the slot's contents are in the cache afterwards.

        Skipped when the state is larger than the whole cache, when it cannot fit beside `keep`, and, unless
        `idle`, when streams are running and copying it would stall them for more than a step; a skip is
        counted unless `idle` (an idle stash is optional: the slot keeps its state)."""
        tokens = tuple(slot.cached_tokens)
        budget = self.config.prompt_cache_bytes
        if not budget or len(tokens) < self.config.snapshot_min_tokens:
            return False
        if tokens in self._prompt_cache:
            self._prompt_cache.move_to_end(tokens)
            return True
        assert self._state_size is not None  # checked in __init__
        n_bytes = self._state_size(slot.index)
        kept_bytes = self._prompt_cache[keep].n_bytes if keep is not None else 0
        if n_bytes + kept_bytes > budget or (not idle and self._stash_would_stall(n_bytes)):
            if not idle:  # an idle stash that does not fit loses nothing: the slot still holds its state
                self.counters.n_prompt_cache_stashes_skipped += 1
            return False
        self._make_room(plan, n_bytes, keep)
        entry = CacheEntry(self._next_entry_id, n_bytes)
        self._next_entry_id += 1
        self._cache_add(tokens, entry)
        plan.ops.append(CacheOp("stash", slot.index, entry=entry.entry_id, n_bytes=n_bytes))
        return True

    def _stash_would_stall(self, n_bytes: int) -> bool:
        if not self._streams_running or self.step_seconds is None:
            return False  # nobody is waiting for this step, or no decode step has been timed yet
        return n_bytes * self.stash_seconds_per_byte > MAX_STASH_STALL_STEPS * self.step_seconds

    def _make_room(self, plan: StepPlan, n_bytes: int, keep: tuple[int, ...] | None) -> None:
        """Drop least recently used entries until n_bytes more fit. The drops come before the stash in the
        plan, so the backend never holds more than the budget."""
        budget = self.config.prompt_cache_bytes
        while self.counters.prompt_cache_bytes + n_bytes > budget:
            tokens = next(t for t in self._prompt_cache if t != keep)
            evicted = self._cache_remove(tokens)
            plan.ops.append(CacheOp("drop", 0, entry=evicted.entry_id))
            self.counters.n_prompt_cache_evictions += 1

    # The index and its byte and entry counts change together, only here.
    def _cache_add(self, tokens: tuple[int, ...], entry: CacheEntry) -> None:
        self._prompt_cache[tokens] = entry
        self.counters.prompt_cache_entries += 1
        self.counters.prompt_cache_bytes += entry.n_bytes

    def _cache_remove(self, tokens: tuple[int, ...]) -> CacheEntry:
        entry = self._prompt_cache.pop(tokens)
        self.counters.prompt_cache_entries -= 1
        self.counters.prompt_cache_bytes -= entry.n_bytes
        return entry

    def _stash_an_idle_slot(self, plan: StepPlan) -> None:
        """With nothing else to do, save one free slot's contents that the cache lacks: a later request that
        takes the slot finds them saved and needs no stash while other streams wait (one per step, so a
        request arriving now waits for at most one stash)."""
        for slot in self.slots:
            tokens = slot.cached_tokens
            if (
                len(tokens) >= self.config.snapshot_min_tokens
                and tuple(tokens) not in self._prompt_cache
                and self._stash(plan, slot, idle=True)
            ):
                return

    def _apply_reuse_bookkeeping(self, slot: Slot, n_reuse: int, op: CacheOp | None) -> None:
        if op is not None and op.kind == "restore":
            assert slot.snapshot_tokens is not None
            slot.cached_tokens = list(slot.snapshot_tokens)
        else:
            del slot.cached_tokens[n_reuse:]

    def _bind(self, seq: Sequence, slot: Slot, status: SequenceStatus) -> None:
        slot.sequence = seq
        seq.slot = slot.index
        seq.status = status
        seq.scheduled_at = time.monotonic()

    def _plan_decodes(self, plan: StepPlan) -> int:
        n_scheduled = 0
        for slot in self.slots:
            seq = slot.sequence
            if seq is None or seq.status is not SequenceStatus.DECODE:
                continue
            start = len(slot.cached_tokens)
            # After a rollback (a model without partial removal), the accepted tokens before the pending one
            # are decoded again: everything the slot does not hold yet, which is normally the pending token only.
            tokens = (seq.pending_token,) if start == seq.n_tokens_total - 1 else _tokens_from(seq, start)
            plan.entries.append(BatchEntry(slot.index, tokens, start, logits_last=True))
            plan.entry_sequences.append(seq)
            n_scheduled += len(tokens)
        return n_scheduled

    def _plan_drafts(self, plan: StepPlan, budget: int) -> int:
        """Draft for decoding slots while the step is small (see SpeculationConfig) and their acceptance pays;
        extend their entries with the drafts; return the tokens added."""
        spec = self.config.speculation
        assert spec is not None and self._drafter is not None
        spare = min(budget, spec.max_step_tokens - sum(len(entry.tokens) for entry in plan.entries))
        requests: list[DraftRequest] = []
        positions: list[int] = []
        plan.draft_cost = self.draft_token_cost * len(plan.entries)
        if spec.max_break_even < 1.0 and not draft_pays(
            spec.max_break_even, plan.draft_cost, spec.draft_min, spec.min_gain
        ):
            return 0  # the step is too busy for any likely draft to pay (SpeculationConfig.max_break_even)
        for position, (entry, seq) in enumerate(zip(plan.entries, plan.entry_sequences, strict=True)):
            if spare < spec.draft_min:
                break
            n_max = min(seq.spec.draft_length(spec, plan.draft_cost), spare, self._draft_room(seq))
            if n_max < spec.draft_min or not seq.request.params.speculative or not seq.spec.wants_draft():
                continue
            requests.append(DraftRequest(seq.seq_id, entry.slot, seq.prompt, seq.output_tokens, n_max))
            positions.append(position)
            spare -= n_max
        if not requests:
            return 0
        started = time.perf_counter()
        try:
            drafts = self._drafter.draft(requests)
            self._draft_seconds = time.perf_counter() - started  # a draft model's decodes: part of the cost
        except BackendError:
            self.counters.n_draft_failures += 1
            return 0
        n_added = 0
        for position, request, draft in zip(positions, requests, drafts, strict=True):
            entry, seq = plan.entries[position], plan.entry_sequences[position]
            draft = self._until_end_of_generation(tuple(draft[: request.n_max]), seq)
            if len(draft) < spec.draft_min:
                continue
            plan.entries[position] = replace(entry, tokens=entry.tokens + draft, n_logits=len(draft) + 1)
            plan.drafts[seq.seq_id] = draft
            if not self.config.supports_partial_removal:
                plan.ops.append(CacheOp("checkpoint", entry.slot))  # the rollback point, should a draft miss
                self.slots[entry.slot].checkpoint_length = entry.start_pos
            n_added += len(draft)
        return n_added

    def _until_end_of_generation(self, draft: tuple[int, ...], seq: Sequence) -> tuple[int, ...]:
        """The draft up to its first end-of-generation token, which ends the choice once accepted, so nothing
        after it can be used (an n-gram draft that reaches the end of a quoted passage runs on into the chat
        template's turn markers); with ignore_eos, which bans that token, up to just before it."""
        for i, token in enumerate(draft):
            if self._vocab.is_eog(token):
                return draft[:i] if seq.request.params.ignore_eos else draft[: i + 1]
        return draft

    def _draft_room(self, seq: Sequence) -> int:
        """Most tokens worth drafting: k drafts emit at most k + 1 tokens, within max_tokens and the context."""
        room = self.config.n_ctx_per_slot - seq.n_tokens_total  # drafts sit at positions n_total.. < n_ctx
        max_tokens = seq.request.params.max_tokens
        if max_tokens is not None:
            room = min(room, max_tokens - len(seq.output_tokens) - 1)
        return room

    def _plan_prefills(self, plan: StepPlan, budget: int) -> None:
        prefilling = [
            slot.sequence
            for slot in self.slots
            if slot.sequence is not None and slot.sequence.status is SequenceStatus.PREFILL
        ]
        prefilling.sort(key=lambda seq: seq.request.arrival_time)
        for seq in prefilling:
            if budget <= 0:
                break
            assert seq.slot is not None
            n_chunk = min(seq.n_prompt_tokens - seq.n_prompt_done, budget)
            last = seq.n_prompt_done + n_chunk == seq.n_prompt_tokens
            plan.entries.append(self._prefill_entry(seq, seq.slot, n_chunk, last))
            plan.entry_sequences.append(seq)
            budget -= n_chunk

    @staticmethod
    def _prefill_entry(seq: Sequence, slot: int, n_chunk: int, last: bool) -> BatchEntry:
        start = seq.n_prompt_done
        chunk = seq.prompt[start : start + n_chunk]
        if not seq.wants_prompt_logprobs:
            return BatchEntry(slot, chunk, start, logits_last=last)
        # Position i's logits give token i + 1's logprob; the prompt's last position has no next prompt token
        # (the slice ends there), its logits give the first generated token.
        targets = seq.prompt[start + 1 : start + n_chunk + 1]
        n_top = seq.request.prompt_logprobs or 0
        return BatchEntry(slot, chunk, start, logits_last=last, logprob_targets=targets, top_logprobs=n_top)

    def _order_batch(self, plan: StepPlan) -> None:
        """Sort entries by slot and work out which flattened batch position each sampler reads."""
        order = sorted(range(len(plan.entries)), key=lambda i: plan.entries[i].slot)
        plan.entries = [plan.entries[i] for i in order]
        plan.entry_sequences = [plan.entry_sequences[i] for i in order]
        position = 0
        for entry, seq in zip(plan.entries, plan.entry_sequences, strict=True):
            position += len(entry.tokens)
            if entry.logits_last and seq.request.params.max_tokens != 0:  # max_tokens 0: prompt logprobs only
                logits_index = position - entry.n_logits  # n_logits > 1: the pending token's, drafts after it
                plan.samples.append((seq, logits_index))
                if seq.status is SequenceStatus.PREFILL:
                    plan.samples += [(child, logits_index) for child in self._children(seq)]

    def _children(self, parent: Sequence) -> list[Sequence]:
        return self._requests[parent.request.request_id][1:] if parent.choice_index == 0 else []

    # --- commit helpers --------------------------------------------------------------------------
    def _record_decoded(self, entry: BatchEntry, seq: Sequence) -> list[StepEvent]:
        """Book a decoded entry; the finishing events of a prompt-only request (max_tokens 0) that it completed."""
        slot = self.slots[entry.slot]
        slot.cached_tokens.extend(entry.tokens)
        if seq.status is not SequenceStatus.PREFILL:
            return []
        seq.n_prompt_done += len(entry.tokens)
        self.counters.n_prompt_tokens_computed += len(entry.tokens)
        if seq.n_prompt_done < seq.n_prompt_tokens:
            return []
        seq.status = SequenceStatus.DECODE
        if not self.config.supports_partial_removal and seq.n_prompt_tokens >= self.config.snapshot_min_tokens:
            slot.needs_save = self.config.prefix_reuse
        children = self._children(seq)
        for child in children:
            child.n_prompt_done = seq.n_prompt_tokens
            child.n_cached_tokens = seq.n_cached_tokens
            child.prompt_logprobs = seq.prompt_logprobs  # one prefill, the same prompt logprobs for every choice
        if seq.request.params.max_tokens == 0:
            # Nothing to generate: every choice ends here; the children never need their copy of the prompt.
            return [self._finish_prompt_only(choice) for choice in (seq, *children)]
        for child in children:
            assert child.slot is not None
            child.status = SequenceStatus.DECODE
            self._fork_sources[child.slot] = entry.slot
        return []

    def _finish_prompt_only(self, seq: Sequence) -> StepEvent:
        return self._finish_sequence(
            seq, FinishReason.LENGTH, "", (), (), prompt_logprobs=self._first_event_prompt_logprobs(seq)
        )

    @staticmethod
    def _first_event_prompt_logprobs(seq: Sequence) -> tuple[TokenLogprob, ...]:
        """What a choice's first event carries: the prompt logprobs, when the request asked for them."""
        return tuple(seq.prompt_logprobs) if seq.wants_prompt_logprobs and len(seq.output_tokens) <= 1 else ()

    def _accept(self, seq: Sequence, sampled: SampledToken) -> StepEvent:
        """Append a sampled token to a sequence: text delta, and whether it has finished."""
        token = sampled.token
        params = seq.request.params
        seq.output_tokens.append(token)
        if len(seq.output_tokens) == 1:
            seq.first_token_at = time.monotonic()
        self.counters.n_generated_tokens += 1
        logprobs = (sampled.logprob,) if sampled.logprob is not None else ()
        prompt_logprobs = self._first_event_prompt_logprobs(seq)
        if self._vocab.is_eog(token) and not params.ignore_eos:
            return self._finish_sequence(
                seq, FinishReason.STOP, seq.text.flush(), (token,), logprobs, prompt_logprobs=prompt_logprobs
            )
        text = seq.text.push(self._vocab.piece(token))
        if seq.text.stopped:
            return self._finish_sequence(
                seq, FinishReason.STOP, text, (token,), logprobs, prompt_logprobs=prompt_logprobs
            )
        out_of_tokens = params.max_tokens is not None and len(seq.output_tokens) >= params.max_tokens
        if out_of_tokens or seq.n_tokens_total >= self.config.n_ctx_per_slot:
            text += seq.text.flush()
            return self._finish_sequence(
                seq, FinishReason.LENGTH, text, (token,), logprobs, prompt_logprobs=prompt_logprobs
            )
        return StepEvent(seq, text, (token,), logprobs, None, prompt_logprobs=prompt_logprobs)

    def _accept_run(
        self, seq: Sequence, run: list[SampledToken], draft: tuple[int, ...], draft_cost: float
    ) -> StepEvent:
        """Book a verified draft (cut the rejected tokens out of the slot, next step) and emit the run's tokens
        one by one, as if each came from its own step: a stop string, EOS or max_tokens inside the run ends the
        output exactly where decoding without speculation would. One event for the whole run."""
        n_accepted = common_prefix_length((sampled.token for sampled in run), draft)
        self._book_verification(seq, len(draft), n_accepted, draft_cost)
        events = []
        for sampled in run:
            events.append(self._accept(seq, sampled))
            if events[-1].finish_reason is not None:
                break
        if len(events) == 1:
            return events[0]
        last = events[-1]
        return StepEvent(
            seq,
            "".join(event.text for event in events),
            tuple(token for event in events for token in event.token_ids),
            tuple(logprob for event in events for logprob in event.logprobs),
            last.finish_reason,
            last.error,
            events[0].prompt_logprobs,
        )

    def _book_verification(self, seq: Sequence, n_drafted: int, n_accepted: int, draft_cost: float) -> None:
        """The slot holds [.., pending, d1..dk]; keep [.., pending, d1..d_accepted] (a truncate, or on a model
        without partial removal a rollback to the checkpoint taken before the decode: the accepted tokens
        are then decoded again with the next pending token)."""
        assert seq.slot is not None
        slot = self.slots[seq.slot]
        n_rejected = n_drafted - n_accepted
        if n_rejected:
            if self.config.supports_partial_removal:
                del slot.cached_tokens[-n_rejected:]
                op = CacheOp("truncate", slot.index, n_keep=len(slot.cached_tokens))
            else:
                n_keep = slot.checkpoint_length
                del slot.cached_tokens[n_keep:]
                op = CacheOp("rollback", slot.index, n_keep=n_keep)
            self._pending_rollbacks[slot.index] = op
        seq.spec.record(n_drafted, n_accepted, self.config.speculation or SpeculationConfig(), draft_cost)
        slot.n_drafted += n_drafted
        slot.n_accepted += n_accepted
        self.counters.n_draft_tokens += n_drafted
        self.counters.n_draft_accepted += n_accepted

    def _finish_sequence(
        self,
        seq: Sequence,
        reason: FinishReason,
        text: str,
        token_ids: tuple[int, ...],
        logprobs: tuple[TokenLogprob, ...],
        error: str | None = None,
        *,
        prompt_logprobs: tuple[TokenLogprob, ...] = (),
    ) -> StepEvent:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq.slot is not None:
            self._release_slot(seq)
        if self._drafter is not None:
            self._drafter.forget(seq.seq_id)
        siblings = self._requests.get(seq.request.request_id, [])
        if all(s.status is SequenceStatus.FINISHED for s in siblings):
            self._requests.pop(seq.request.request_id, None)
            if reason in (FinishReason.STOP, FinishReason.LENGTH):
                self.counters.n_requests_finished += 1
            elif reason is not FinishReason.CANCELLED:
                self.counters.n_requests_failed += 1
        return StepEvent(seq, text, token_ids, logprobs, reason, error, prompt_logprobs)

    def _release_slot(self, seq: Sequence) -> None:
        assert seq.slot is not None
        slot = self.slots[seq.slot]
        slot.sequence = None
        seq.slot = None
        # a child that finished on its first token never needs its copy of the parent's prompt
        self._fork_sources.pop(slot.index, None)

    def _forget_slot(self, index: int) -> None:
        slot = self.slots[index]
        slot.cached_tokens = []
        slot.needs_save = False
        self._fork_sources.pop(index, None)
        self._pending_rollbacks.pop(index, None)
        self._slots_to_clear.add(index)

    def _finish_request(self, request_id: str, reason: FinishReason, error: str | None) -> list[StepEvent]:
        choices = self._requests.get(request_id)
        if choices is None:
            return []
        if choices[0].status is SequenceStatus.WAITING:
            self._waiting = deque(w for w in self._waiting if w[0].request.request_id != request_id)
        # A prefill stopped half-way leaves a valid prefix in its slot (exactly `cached_tokens`), and a forking
        # child's slot still holds its old contents: both stay reusable, nothing to undo.
        return [
            self._finish_sequence(seq, reason, "", (), (), error)
            for seq in choices
            if seq.status is not SequenceStatus.FINISHED
        ]


def _past_deadline(request: Request, now: float) -> bool:
    return request.deadline is not None and now >= request.deadline


def _tokens_from(seq: Sequence, start: int) -> tuple[int, ...]:
    """The sequence's tokens (prompt, then output) from position `start` on."""
    n_prompt = seq.n_prompt_tokens
    if start >= n_prompt:
        return tuple(seq.output_tokens[start - n_prompt :])
    return seq.prompt[start:] + tuple(seq.output_tokens)
