"""The engine: one thread owns the scheduler and the backend and runs the step loop; the asyncio side only
submits, cancels and reads. Events cross back to the event loop at most once per step (loop_waker.py), so
the loop never waits on llama.cpp and llama.cpp never waits on the loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from bindings.protocol import (
    Backend,
    BackendError,
    CacheOp,
    Drafter,
    Embedder,
    EmbedderInfo,
    ModelInfo,
    SampledToken,
    SamplingParams,
    TokenLogprob,
    Vocab,
)
from server.engine.core_share import CoreShare
from server.engine.embedding_queue import EmbeddingJob, EmbeddingQueue
from server.engine.event_buffer import TokenEventBuffer
from server.engine.loop_waker import LoopWaker, loop_waker
from server.engine.request import Request, TokenEvent
from server.engine.scheduler import Scheduler, SchedulerConfig, StepPlan
from server.engine.sequence import Sequence, StepEvent
from server.engine.speculation import CacheFollower, SpeculationConfig, verify_draft
from server.errors import (
    ApiError,
    ContextLengthExceededError,
    EngineFailureError,
    InvalidRequestError,
    QueueFullError,
    ServiceUnavailableError,
)

log = logging.getLogger(__name__)

# How stale GET /slots and the busy-slot gauges may be while every slot keeps decoding: reading all slots takes
# ~35 µs at 16 slots, ~0.6% of a single-stream SmolLM2 step, for a snapshot only a scrape or a person reads.
# A step that gives a slot a choice or ends one, and the engine going idle, refresh it at once.
SLOT_STATUS_REFRESH_S = 0.05


@dataclass(frozen=True)
class EngineConfig:
    max_batch_tokens: int = 512  # token budget per step (decode tokens + prefill chunks)
    max_queue: int = 64  # requests allowed to wait beyond the free slots
    request_timeout_s: float | None = 600.0
    prefix_reuse: bool = True
    snapshot_min_tokens: int = 16  # smallest state worth saving (recurrent prompt snapshots, prompt cache)
    prompt_cache_bytes: int = 0  # RAM for past slot states kept for later requests with the same prefix (0: off)
    idle_poll_s: float = 0.5  # how often an idle engine thread re-checks deadlines
    speculation: SpeculationConfig | None = None  # speculative decoding (needs a drafter); None: off
    stream_interval_s: float = 0.0  # hand tokens to the event loop at most this often (event_buffer.py); 0: each step


@dataclass(frozen=True)
class SlotStatus:
    slot: int
    state: str  # idle | prefill | decode
    request_id: str | None
    choice_index: int
    n_cached_tokens: int  # tokens whose KV/state the slot holds now
    n_prompt_tokens: int
    n_generated_tokens: int
    n_drafted: int = 0  # speculative decoding in this slot since the server started: tokens drafted ...
    n_accepted: int = 0  # ... and accepted

    @property
    def acceptance(self) -> float | None:
        return self.n_accepted / self.n_drafted if self.n_drafted else None


@dataclass(frozen=True)
class EngineStats:
    n_slots: int
    n_slots_busy: int
    n_requests_waiting: int
    n_requests_running: int
    n_requests_finished: int
    n_requests_failed: int
    n_prompt_tokens_computed: int
    n_prompt_tokens_cached: int
    n_generated_tokens: int
    n_steps: int
    n_decode_errors: int
    seconds_decoding: float
    prompt_cache_budget_bytes: int = 0
    prompt_cache_bytes: int = 0
    prompt_cache_entries: int = 0
    n_prompt_cache_hits: int = 0
    n_prompt_cache_misses: int = 0
    n_prompt_cache_evictions: int = 0
    n_prompt_cache_stashes_skipped: int = 0
    stash_seconds_per_mib: float = 0.0  # what a stash costs on the engine thread, as measured (running estimate)
    kv_cache_usage: float = 0.0  # tokens the slots hold / tokens they can hold (vLLM's kv_cache_usage_perc, 0..1)
    spec_type: str = "none"  # the drafter speculative decoding uses (none: off)
    n_draft_tokens: int = 0  # tokens drafted and verified
    n_draft_accepted: int = 0  # of those, accepted


@dataclass(frozen=True)
class _Submit:
    choices: list[Sequence]


@dataclass(frozen=True)
class _Cancel:
    request_id: str


@dataclass(frozen=True)
class _Embed:
    job: EmbeddingJob


class RequestStream:
    """The reader's end of one request: its TokenEvents, all choices interleaved, in order."""

    def __init__(self, engine: Engine, request: Request) -> None:
        self._engine = engine
        self.request_id = request.request_id
        self.n_prompt_tokens = len(request.prompt_tokens)
        self._n_choices_open = request.n  # reader side: choices not yet finished
        self._n_finishes_undelivered = request.n  # dispatch side: finishing events still to come
        self._events: asyncio.Queue[TokenEvent | ApiError] = asyncio.Queue()  # an error: Engine.abandon
        self._cancelled = False

    @property
    def finished(self) -> bool:
        return self._n_choices_open == 0

    def _deliver(self, event: TokenEvent) -> bool:
        """Queue an event for the reader; True once every choice's finishing event has been queued."""
        self._events.put_nowait(event)
        if event.finish_reason is not None:
            self._n_finishes_undelivered -= 1
        return self._n_finishes_undelivered == 0

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        try:
            while self._n_choices_open:
                event = await self._events.get()
                if isinstance(event, ApiError):  # the engine gave up on this request (Engine.abandon)
                    raise event
                if event.finish_reason is not None:
                    self._n_choices_open -= 1
                yield event
        finally:
            if self._n_choices_open:
                self.cancel()

    def _abandon(self, error: ApiError) -> None:
        """The reader gets `error` after the events queued so far; no more will come."""
        self._events.put_nowait(error)

    def cancel(self) -> None:
        if not self._cancelled and self._n_choices_open:
            self._cancelled = True
            self._engine.cancel(self.request_id)


class Engine:
    def __init__(
        self,
        backend: Backend,
        config: EngineConfig | None = None,
        *,
        load_report: Mapping[str, Any] | None = None,
        embedder: Embedder | None = None,
        drafter: Drafter | None = None,
        core_share: CoreShare | None = None,
    ) -> None:
        """`drafter`: speculative decoding's (with config.speculation); the engine closes it when it stops.
        `core_share`: the CPU threads this engine shares with other models' engines (core_share.py)."""
        self.config = config or EngineConfig()
        self._core_share = core_share
        self._n_threads: int | None = None  # what the backend was last told (core_share); None: as loaded
        self.load_report = load_report  # how the model was loaded (the offload plan, its memory check), for GET /plan
        self._backend = backend
        self._embedder = embedder  # None: embeddings are off (POST /v1/embeddings says how to turn them on)
        self._embedding_queue = (
            EmbeddingQueue(embedder.info.n_seq_max, embedder.info.n_batch) if embedder is not None else None
        )
        self._n_embedding_jobs = 0  # submitted and not yet answered; guarded by _lock
        info = backend.info
        self._scheduler = Scheduler(
            SchedulerConfig(
                n_slots=info.n_slots,
                n_ctx_per_slot=info.n_ctx_per_slot,
                max_batch_tokens=max(info.n_slots, min(self.config.max_batch_tokens, info.n_batch)),
                supports_partial_removal=info.supports_partial_removal,
                prefix_reuse=self.config.prefix_reuse,
                snapshot_min_tokens=self.config.snapshot_min_tokens,
                prompt_cache_bytes=self.config.prompt_cache_bytes if self.config.prefix_reuse else 0,
                speculation=self.config.speculation if drafter is not None else None,
            ),
            backend,
            backend.state_size,
            drafter,
        )
        self._drafter = drafter
        # A drafter with its own per-slot memory (an MTP head) follows the target's cache ops.
        self._cache_follower = drafter if isinstance(drafter, CacheFollower) else None
        self._inbox: queue.SimpleQueue[_Submit | _Cancel | _Embed | None] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._waker: LoopWaker | None = None  # hands the engine thread's events to the event loop (start())
        self._streams: dict[str, RequestStream] = {}  # touched only on the event loop thread
        self._outbox = TokenEventBuffer(self.config.stream_interval_s)  # touched only on the engine thread
        self._last_step_seconds = 0.0  # the engine thread's previous step, wall time
        self._abandoned: Callable[[], ApiError] | None = None  # set by abandon(), on the event loop thread
        self._seq_ids = itertools.count()
        self._lock = threading.Lock()  # guards the counters below, shared by both threads
        self._n_waiting = 0
        self._n_free_slots = info.n_slots
        self._n_steps = 0
        self._n_decode_errors = 0
        self._seconds_decoding = 0.0
        self._slot_statuses: list[SlotStatus] = self._read_slot_statuses()
        self._statuses_due = 0.0  # monotonic time after which a step refreshes _slot_statuses

    # --- the asyncio side ----------------------------------------------------------------------------
    @property
    def info(self) -> ModelInfo:
        return self._backend.info

    @property
    def vocab(self) -> Vocab:
        return self._backend

    @property
    def embedder_info(self) -> EmbedderInfo | None:
        """The embedding context's shape; None when embeddings are off."""
        return self._embedder.info if self._embedder is not None else None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    def start(self) -> None:
        self._waker = loop_waker(asyncio.get_running_loop())
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._abandoned is not None:  # its thread never returns and its buffers cannot be freed: see abandon()
            return
        self._stopping.set()
        self._inbox.put(None)
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join()  # its last act publishes an ERROR event for every unfinished request
        if self._waker is not None:
            self._waker.close()  # after the join: those last events still reach their streams
        if self._embedder is not None:
            self._embedder.close()  # its context uses the backend's model: freed first
        if self._drafter is not None:
            self._drafter.close()
        self._backend.close()

    def submit(self, request: Request) -> RequestStream:
        self._validate(request)
        if request.deadline is None and self.config.request_timeout_s is not None:
            request = replace(request, deadline=request.arrival_time + self.config.request_timeout_s)
        with self._lock:
            if self._n_waiting >= self.config.max_queue + self._n_free_slots:
                raise QueueFullError(
                    f"server is at capacity: {self._n_waiting} requests are waiting for a free slot",
                    retry_after_s=self._retry_after_s(),
                )
            self._n_waiting += 1
        stream = RequestStream(self, request)
        self._streams[request.request_id] = stream
        choices = [Sequence(next(self._seq_ids), request, index) for index in range(request.n)]
        self._inbox.put(_Submit(choices))
        self._wakeup.set()
        return stream

    def cancel(self, request_id: str) -> None:
        self._inbox.put(_Cancel(request_id))
        self._wakeup.set()

    def abandon(self, failure: Callable[[], ApiError]) -> None:
        """Event loop side, for a backend that will never return: an RPC worker it uses died, and the engine
        thread stays blocked in llama_decode (bindings/rpc.py WorkerLossHook). Every live request fails with
        failure() now, every later submit too, without the engine thread; stop() then leaves the thread and the
        backend alone (joining would wait forever; freeing goes through the dead connection): the process is
        replaced instead (server/rpc/failover.py)."""
        self._abandoned = failure
        streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream._abandon(failure())

    def embed(self, inputs: list[list[int]]) -> concurrent.futures.Future[list[bytes]]:
        """Queue inputs (token lists) for embedding; the future gets one pooled, unnormalized vector (n_embd
        little-endian float32) per input, in order. Cancelling it drops the inputs not yet decoded."""
        self._validate_embedding(inputs)
        with self._lock:
            if self._n_embedding_jobs >= max(1, self.config.max_queue):
                raise QueueFullError(
                    f"server is at capacity: {self._n_embedding_jobs} embedding requests are waiting",
                    retry_after_s=self._retry_after_s(),
                )
            self._n_embedding_jobs += 1
        job = EmbeddingJob(tuple(tuple(tokens) for tokens in inputs))
        job.future.add_done_callback(self._embedding_job_done)
        self._inbox.put(_Embed(job))
        self._wakeup.set()
        return job.future

    def _embedding_job_done(self, _future: concurrent.futures.Future[list[bytes]]) -> None:
        with self._lock:
            self._n_embedding_jobs -= 1

    def _validate_embedding(self, inputs: list[list[int]]) -> None:
        if self._abandoned is not None:
            raise self._abandoned()
        if not self.running:
            raise ServiceUnavailableError("the engine is not running")
        info = self.embedder_info
        if info is None:
            raise InvalidRequestError("embeddings are off on this server", param="model", code="embeddings_disabled")
        for index, tokens in enumerate(inputs):
            where = "input" if len(inputs) == 1 else f"input[{index}]"
            if not tokens:
                raise InvalidRequestError(f"{where} is empty", param="input")
            if any(not 0 <= t < self.info.n_vocab for t in tokens):
                raise InvalidRequestError(f"{where} holds token ids outside [0, {self.info.n_vocab})", param="input")
            if len(tokens) > info.n_ctx:
                raise ContextLengthExceededError(
                    f"{where} has {len(tokens)} tokens; this server embeds at most {info.n_ctx} tokens per input "
                    "(one embedding decode: --max-batch-tokens)",
                    param="input",
                )

    def slots(self) -> list[SlotStatus]:
        with self._lock:
            return list(self._slot_statuses)

    def stats(self) -> EngineStats:
        counters = self._scheduler.counters
        with self._lock:
            busy = sum(1 for s in self._slot_statuses if s.state != "idle")
            return EngineStats(
                n_slots=self.info.n_slots,
                n_slots_busy=busy,
                n_requests_waiting=self._n_waiting,
                n_requests_running=len({s.request_id for s in self._slot_statuses if s.request_id}),
                n_requests_finished=counters.n_requests_finished,
                n_requests_failed=counters.n_requests_failed,
                n_prompt_tokens_computed=counters.n_prompt_tokens_computed,
                n_prompt_tokens_cached=counters.n_prompt_tokens_cached,
                n_generated_tokens=counters.n_generated_tokens,
                n_steps=self._n_steps,
                n_decode_errors=self._n_decode_errors,
                seconds_decoding=self._seconds_decoding,
                prompt_cache_budget_bytes=self._scheduler.config.prompt_cache_bytes,
                prompt_cache_bytes=counters.prompt_cache_bytes,
                prompt_cache_entries=counters.prompt_cache_entries,
                n_prompt_cache_hits=counters.n_prompt_cache_hits,
                n_prompt_cache_misses=counters.n_prompt_cache_misses,
                n_prompt_cache_evictions=counters.n_prompt_cache_evictions,
                n_prompt_cache_stashes_skipped=counters.n_prompt_cache_stashes_skipped,
                stash_seconds_per_mib=self._scheduler.stash_seconds_per_byte * (1 << 20),
                kv_cache_usage=sum(s.n_cached_tokens for s in self._slot_statuses)
                / max(1, self.info.n_slots * self.info.n_ctx_per_slot),
                spec_type=self._drafter.name if self._drafter is not None else "none",
                n_draft_tokens=counters.n_draft_tokens,
                n_draft_accepted=counters.n_draft_accepted,
            )

    def _validate(self, request: Request) -> None:
        if self._abandoned is not None:
            raise self._abandoned()
        if not self.running:
            raise ServiceUnavailableError("the engine is not running")
        n_prompt = len(request.prompt_tokens)
        n_ctx = self.info.n_ctx_per_slot
        if n_prompt == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if request.n > self.info.n_slots:
            raise InvalidRequestError(
                f"n={request.n} choices need {request.n} slots; this server runs {self.info.n_slots}",
                param="n",
            )
        if any(not 0 <= t < self.info.n_vocab for t in request.prompt_tokens):
            raise InvalidRequestError(f"prompt holds token ids outside [0, {self.info.n_vocab})", param="prompt")
        max_tokens = request.params.max_tokens
        if n_prompt >= n_ctx:
            raise ContextLengthExceededError(
                f"the prompt has {n_prompt} tokens; this server's context is {n_ctx} tokens per request",
                param="messages",
            )
        if max_tokens is not None and n_prompt + max_tokens > n_ctx:
            raise ContextLengthExceededError(
                f"this server's context is {n_ctx} tokens per request, but {n_prompt} prompt tokens + "
                f"max_tokens {max_tokens} = {n_prompt + max_tokens}; lower max_tokens or shorten the prompt",
                param="max_tokens",
            )

    def _retry_after_s(self) -> int:
        """A rough wait: seconds per step × the steps a request takes × waiting requests per slot."""
        if not self._n_steps:
            return 1
        seconds_per_step = self._seconds_decoding / self._n_steps
        return max(1, math.ceil(seconds_per_step * 64 * self._n_waiting / max(1, self.info.n_slots)))

    def _dispatch(self, events: list[TokenEvent]) -> None:
        """Runs on the event loop: hand each event to its stream."""
        for event in events:
            stream = self._streams.get(event.request_id)
            if stream is None:
                continue
            if stream._deliver(event):
                del self._streams[event.request_id]

    # --- the engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        budget = self._scheduler.config.max_batch_tokens
        log.info("engine thread started: %d slots, %d tokens per step", self.info.n_slots, budget)
        while not self._stopping.is_set():
            try:
                self._step()
            except Exception:  # a bug must not kill the server: fail what was running, keep serving
                log.exception("engine step failed; failing the running requests")
                self._fail_everything("internal error in the engine step")
        self._fail_everything("server shutting down")
        self._release_cores()
        if self._embedding_queue is not None:
            self._embedding_queue.fail_all(ServiceUnavailableError("server shutting down"))

    def _step(self) -> None:
        started = time.monotonic()
        events = self._drain_inbox()
        events += self._scheduler.expire(started)
        plan = self._scheduler.schedule()
        if plan.empty:
            self._publish(events, idle=True)
            if not self._embed_once():
                self._release_cores()
                self._wait_for_work()
            return
        self._claim_cores()
        if len(self._outbox) and (plan.ops or plan.n_tokens > len(plan.entries)):
            self._hand_over(idle=True)  # memory ops, prefill or drafts make this step long: nothing waits for it
        events += self._execute(plan)
        self._publish(events, slots_changed=bool(plan.admitted))
        self._last_step_seconds = time.monotonic() - started
        # At most one embedding decode between two chat steps: a running stream waits one decode at most.
        self._embed_once()

    def _claim_cores(self) -> None:
        """With other engines on the same cores: decode on this engine's share of them now."""
        if self._core_share is None:
            return
        n_threads = self._core_share.claim(id(self))
        if n_threads == self._n_threads:
            return
        try:
            self._backend.set_threads(n_threads)
        except BackendError as exc:  # the decode still runs, on the threads it had
            log.warning("could not set %d threads: %s", n_threads, exc)
            return
        self._n_threads = n_threads

    def _release_cores(self) -> None:
        if self._core_share is not None:
            self._core_share.release(id(self))

    def _embed_once(self) -> bool:
        """Run the next embedding decode, if any is waiting; False when none was."""
        if self._embedder is None or self._embedding_queue is None:
            return False
        batch = self._embedding_queue.next_batch()
        if batch is None:
            return False
        self._hand_over(idle=True)  # held tokens do not wait for an embedding decode
        started = time.perf_counter()
        try:
            vectors = self._embedder.embed(batch.inputs)
        except Exception as exc:  # a failed decode fails its requests only, never the engine thread
            log.error("embedding decode of %d tokens failed: %s", batch.n_tokens, exc)
            with self._lock:
                self._n_decode_errors += 1
            self._embedding_queue.fail(batch, EngineFailureError(f"the model failed to embed this batch: {exc}"))
            return True
        finally:
            with self._lock:
                self._seconds_decoding += time.perf_counter() - started
        self._embedding_queue.complete(batch, vectors)
        return True

    def _execute(self, plan: StepPlan) -> list[StepEvent]:
        started = time.perf_counter()
        try:
            # Inside the try: a sampler that cannot be built (a grammar llama.cpp refuses) fails its batch
            # like a decode error instead of escaping the step loop.
            for seq in plan.admitted:
                self._backend.new_sampler(seq.seq_id, _sampler_params(seq))
            self._apply(plan)
            if not plan.entries:
                return self._scheduler.commit(plan, {})
            decode_started = time.perf_counter()
            self._backend.decode(plan.entries)
            if self._drafter is not None:
                self._drafter.observe(plan.entries)
            sampled: dict[int, SampledToken | list[SampledToken]]
            if plan.drafts:
                sampled = self._verify(plan)
            else:
                sampled = {
                    seq.seq_id: self._backend.sample(seq.seq_id, index, seq.request.params)
                    for seq, index in plan.samples
                }
            prompt_logprobs = self._prompt_logprobs(plan)
            if all(len(entry.tokens) == 1 for entry in plan.entries):  # a pure decode step: what a stash stalls
                self._scheduler.observe_step(time.perf_counter() - decode_started)
            elif plan.drafts and all(len(entry.tokens) == entry.n_logits for entry in plan.entries):
                # decode tokens and drafts only: what verifying a drafted token costs, for the adaptive rule
                n_drafted = sum(len(draft) for draft in plan.drafts.values())
                self._scheduler.observe_draft_step(time.perf_counter() - decode_started, n_drafted)
        except BackendError as exc:
            log.error("decode of %d tokens failed: %s", plan.n_tokens, exc)
            with self._lock:
                self._n_decode_errors += 1
            return self._scheduler.fail(plan, f"the model failed to decode this batch: {exc}")
        finally:
            elapsed = time.perf_counter() - started
            with self._lock:
                self._n_steps += 1
                self._seconds_decoding += elapsed
        return self._scheduler.commit(plan, sampled, prompt_logprobs)

    def _verify(self, plan: StepPlan) -> dict[int, SampledToken | list[SampledToken]]:
        """Sample every slot; a speculating one position by position while its draft holds (verify_draft)."""
        sampled: dict[int, SampledToken | list[SampledToken]] = {}
        sample = self._backend.sample
        for seq, index in plan.samples:
            draft = plan.drafts.get(seq.seq_id)
            params = seq.request.params
            if draft is None:
                sampled[seq.seq_id] = sample(seq.seq_id, index, params)
            else:
                sampled[seq.seq_id] = verify_draft(draft, _sample_from(sample, seq.seq_id, index, params))
        return sampled

    def _prompt_logprobs(self, plan: StepPlan) -> dict[int, tuple[TokenLogprob, ...]]:
        """The prompt logprobs the backend computed for the entries that asked (by sequence id), checked: a
        short list would silently misalign every later position of the answer."""
        by_seq: dict[int, tuple[TokenLogprob, ...]] = {}
        for entry, seq in zip(plan.entries, plan.entry_sequences, strict=True):
            if not entry.logprob_targets:
                continue
            logprobs = self._backend.prompt_logprobs(entry.slot)
            if len(logprobs) != len(entry.logprob_targets):
                raise BackendError(
                    f"slot {entry.slot}: {len(logprobs)} prompt logprobs for {len(entry.logprob_targets)} positions"
                )
            by_seq[seq.seq_id] = logprobs
        return by_seq

    def _apply(self, plan: StepPlan) -> None:
        """The plan's memory ops, in order; each stash is timed, so the scheduler knows what the next costs."""
        pending: list[CacheOp] = []
        for op in plan.ops:
            if op.kind != "stash":
                pending.append(op)
                continue
            if pending:
                self._backend.apply(pending)
                pending = []
            started = time.perf_counter()
            self._backend.apply([op])
            self._scheduler.observe_stash(op.n_bytes, time.perf_counter() - started)
        if pending:
            self._backend.apply(pending)
        if self._cache_follower is not None and plan.ops:
            self._cache_follower.follow(plan.ops)

    def _drain_inbox(self) -> list[StepEvent]:
        events: list[StepEvent] = []
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return events
            if isinstance(command, _Submit):
                self._scheduler.add(command.choices)
            elif isinstance(command, _Embed) and self._embedding_queue is not None:
                self._embedding_queue.add(command.job)
            elif isinstance(command, _Cancel):
                events += self._scheduler.cancel(command.request_id)

    def _wait_for_work(self) -> None:
        timeout = self.config.idle_poll_s
        deadlines = self._scheduler.deadlines()
        if deadlines:
            timeout = max(0.0, min(timeout, min(deadlines) - time.monotonic()))
        self._wakeup.wait(timeout)
        self._wakeup.clear()

    def _publish(self, step_events: list[StepEvent], *, idle: bool = False, slots_changed: bool = False) -> None:
        """Hand the step's events to the event loop, or hold them in the outbox until the stream interval is
        up (`idle`: the engine sleeps or gives up next, so nothing may stay behind). `slots_changed`: the step
        gave a slot a new choice. A slot is taken only by an admission and freed only with a finishing event, so
        the free-slot count is recounted only then."""
        for event in step_events:
            if event.finish_reason is not None:
                self._backend.free_sampler(event.sequence.seq_id)
                slots_changed = True
        now = time.monotonic()
        refresh_statuses = idle or slots_changed or now >= self._statuses_due
        with self._lock:
            self._n_waiting = self._scheduler.n_waiting + self._inbox.qsize()
            if refresh_statuses:
                self._n_free_slots = self._scheduler.n_free_slots
                self._slot_statuses = self._read_slot_statuses()
                self._statuses_due = now + SLOT_STATUS_REFRESH_S
        if self._waker is None:
            return
        self._outbox.add([_token_event(event) for event in step_events])
        self._hand_over(idle=idle)

    def _hand_over(self, *, idle: bool = False) -> None:
        """Send the outbox's due events to the event loop (all of them when `idle`)."""
        token_events = self._outbox.take(time.monotonic(), next_step_s=self._last_step_seconds, idle=idle)
        if not token_events or self._waker is None:
            return
        try:
            self._waker.post(self._dispatch, token_events)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            log.debug("event loop closed; dropping %d events", len(token_events))

    def _fail_everything(self, message: str) -> None:
        self._publish(self._scheduler.fail_all(message), idle=True)

    def _read_slot_statuses(self) -> list[SlotStatus]:
        statuses = []
        for slot in self._scheduler.slots:
            seq = slot.sequence
            statuses.append(
                SlotStatus(
                    slot=slot.index,
                    state="idle" if seq is None else ("prefill" if seq.status.value == "prefill" else "decode"),
                    request_id=seq.request.request_id if seq else None,
                    choice_index=seq.choice_index if seq else 0,
                    n_cached_tokens=len(slot.cached_tokens),
                    n_prompt_tokens=seq.n_prompt_tokens if seq else 0,
                    n_generated_tokens=len(seq.output_tokens) if seq else 0,
                    n_drafted=slot.n_drafted,
                    n_accepted=slot.n_accepted,
                )
            )
        return statuses


def _sample_from(
    sample: Callable[[int, int, SamplingParams], SampledToken],
    sampler_id: int,
    first_index: int,
    params: SamplingParams,
) -> Callable[[int], SampledToken]:
    """Sampling at the i-th verified position of a speculating slot's entry."""
    return lambda i: sample(sampler_id, first_index + i, params)


def _sampler_params(seq: Sequence) -> SamplingParams:
    params = seq.request.params
    if params.seed is not None and seq.choice_index:
        # n > 1 with a seed: each choice gets its own reproducible stream
        return replace(params, seed=params.seed + seq.choice_index)
    return params


def _token_event(event: StepEvent) -> TokenEvent:
    seq = event.sequence
    return TokenEvent(
        request_id=seq.request.request_id,
        choice_index=seq.choice_index,
        text=event.text,
        token_ids=event.token_ids,
        logprobs=event.logprobs,
        finish_reason=event.finish_reason,
        prompt_logprobs=event.prompt_logprobs,
        n_prompt_tokens=seq.n_prompt_tokens,
        n_cached_tokens=seq.n_cached_tokens,
        n_generated_tokens=len(seq.output_tokens),
        error=event.error,
        **(_phase_seconds(seq) if event.finish_reason is not None else {}),
    )


def _phase_seconds(seq: Sequence) -> dict[str, float | None]:
    """A finished choice's queue / prefill / decode seconds (vLLM's split of a request's life)."""
    now = time.monotonic()
    scheduled, first_token = seq.scheduled_at, seq.first_token_at
    return {
        "queue_seconds": (scheduled or now) - seq.request.arrival_time,
        "prefill_seconds": None if scheduled is None else (first_token or now) - scheduled,
        "decode_seconds": None if first_token is None else now - first_token,
    }
