"""The router and lifecycle of every served model: resolve a `model` name, load on demand, evict, unload idle.

Every method runs on the event loop thread; loads run in a thread of their own each (llama.cpp's load is slow
and blocking), engine stops in `asyncio.to_thread`. No lock is held across models: two models' requests only
meet here, in a few dictionary lookups on the loop, and each model's engine has its own thread and context.

A request takes a `Lease` on its model (`acquire`), which loads the model first when it is not loaded (the
request waits; a model preloaded at start answers 503 "loading" instead, as one model always did) and keeps it
from being evicted or unloaded until the lease ends. When a lease ends and the model is idle, its keep_alive
starts: the reaper unloads models idle for longer (0: at once)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from server.chat_template import ChatTemplateError, select_chat_template
from server.engine.engine import Engine
from server.errors import InvalidRequestError, ModelNotFoundError, ModelOverloadedError, ServiceUnavailableError
from server.fleet.admission import Admission, Resident
from server.fleet.keep_alive import KeepAliveError, parse_keep_alive
from server.fleet.slot import ModelSlot
from server.fleet.spec import ModelSpec

log = logging.getLogger(__name__)

# Builds one model's engine (in the loader thread); the slot hears its download's progress.
EngineBuilder = Callable[[ModelSpec, ModelSlot], Engine]
REAP_INTERVAL_S = 1.0
NO_KEEP_ALIVE = object()  # a request that says nothing keeps the model's own keep_alive


class Lease:
    """A request's hold on a loaded model; `release()` (idempotent) when the request is over."""

    def __init__(self, fleet: Fleet, slot: ModelSlot) -> None:
        self.slot = slot
        self._fleet = fleet
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._fleet._released(self.slot)


class Fleet:
    def __init__(
        self,
        specs: Sequence[ModelSpec],
        builder: EngineBuilder,
        admission: Admission,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_startup_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.slots = {spec.id: ModelSlot(spec, "loading" if spec.preload else "unloaded") for spec in specs}
        self.default = self.slots[specs[0].id]
        self._names = {name: self.slots[spec.id] for spec in specs for name in spec.names}
        self._builder = builder
        self.admission = admission
        self._clock = clock
        self._on_startup_failure = on_startup_failure
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed = asyncio.Event()  # pulsed when memory may have freed (a lease ended, a model unloaded)
        self._n_waiting = 0
        self._reaper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.settings = specs[0].settings

    # --- naming -----------------------------------------------------------------------------------
    def resolve(self, name: str | None) -> ModelSlot:
        """The slot a request's `model` names (None: the default model); 404 naming the served ids otherwise."""
        if name is None:
            return self.default
        slot = self._names.get(name)
        if slot is None:
            served = ", ".join(f"'{model_id}'" for model_id in self.slots)
            one = len(self.slots) == 1
            raise ModelNotFoundError(
                f"The model '{name}' does not exist; this server serves {served}."
                if one
                else f"The model '{name}' does not exist; this server serves {served} (and their aliases).",
                param="model",
            )
        return slot

    # --- start and stop ---------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop, *, reap_interval_s: float = REAP_INTERVAL_S) -> None:
        """Start the preloads and the keep_alive reaper (on the event loop)."""
        self._loop = loop
        preloads = [slot for slot in self.slots.values() if slot.status == "loading"]
        self._plan_preloads(preloads)
        for slot in preloads:
            self._start_load(slot, startup=True)
        self._reaper = loop.create_task(self._reap_forever(reap_interval_s))

    def _plan_preloads(self, preloads: Sequence[ModelSlot]) -> None:
        """Admit the preloads in order, each beside the ones before it, so that under a joint plan each loads
        with its share of the machine. One that does not fit still loads (alone-planned), as a single model
        always did: its load then reports what is short. A lone preload plans alone (the same plan)."""
        if len(preloads) < 2:
            return
        admitted: list[ModelSlot] = []
        for slot in preloads:
            residents = [Resident(s.id, self.admission.predicted_bytes(s.spec), False, 0.0) for s in admitted]
            decision = self.admission.decide(slot.spec, residents)
            if decision.kind == "load" and not decision.evict:
                slot.planned = decision.plan
            else:
                log.warning("preloading %s beside %d other model(s): %s", slot.id, len(admitted), decision.reason)
            admitted.append(slot)

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        engines = [engine for slot in self.slots.values() if (engine := slot.stop()) is not None]
        # stop() joins the engine thread, whose last act fails every unfinished request: not on the loop
        await asyncio.gather(*(asyncio.to_thread(engine.stop) for engine in engines))
        for task in list(self._tasks):
            task.cancel()

    # --- requests ---------------------------------------------------------------------------------
    async def acquire(self, name: str | None, keep_alive: Any = NO_KEEP_ALIVE) -> Lease:
        """The named model, loaded, held for one request; waits for a load on demand."""
        slot = self.resolve(name)
        keep_alive_s = self._keep_alive(keep_alive)
        deadline: float | None = None
        while slot.status != "ready":
            if slot.status in ("failed", "stopped") or (slot.status == "loading" and slot.startup_load):
                raise ServiceUnavailableError(slot.unavailable_reason())
            if slot.status in ("loading", "unloading"):
                await slot.settled.wait()
                continue
            if deadline is None:  # on the loop's clock: `clock` times keep_alive only (tests move it)
                deadline = asyncio.get_running_loop().time() + self.settings.load_wait_s
            await self._make_room_and_load(slot, deadline)
        slot.in_flight += 1
        if keep_alive_s is not NO_KEEP_ALIVE:
            slot.keep_alive_s = keep_alive_s
        return Lease(self, slot)

    def _keep_alive(self, value: Any) -> Any:
        if value is NO_KEEP_ALIVE or value is None:
            return NO_KEEP_ALIVE
        try:
            return parse_keep_alive(value)
        except KeepAliveError as exc:
            raise InvalidRequestError(str(exc), param="keep_alive") from None

    def _released(self, slot: ModelSlot) -> None:
        slot.in_flight -= 1
        slot.last_used = self._clock()
        if slot.in_flight == 0 and slot.keep_alive_s == 0 and slot.status == "ready":
            self._spawn(self.unload(slot))
        self._pulse()

    # --- loading ----------------------------------------------------------------------------------
    def residents(self) -> list[Resident]:
        return [
            Resident(
                slot.id,
                self.admission.predicted_bytes(slot.spec),
                idle=slot.status == "ready" and slot.in_flight == 0,
                last_used=slot.last_used,
                priority=slot.spec.priority,
            )
            for slot in self.slots.values()
            if slot.status in ("loading", "ready", "unloading")
        ]

    async def _make_room_and_load(self, slot: ModelSlot, deadline: float) -> None:
        """Start loading the slot once it fits (evicting idle models), or wait for memory until the deadline."""
        decision = self.admission.decide(slot.spec, self.residents())
        if decision.kind == "never":
            raise ServiceUnavailableError(f"The model {slot.id} cannot be loaded here: {decision.reason}.")
        if decision.kind == "load":
            for model_id in decision.evict:
                victim = self.slots[model_id]
                if victim.status == "ready" and victim.in_flight:  # taken by a request meanwhile: decide again
                    return
                log.info("evicting idle model %s to load %s", model_id, slot.id)
                await self.unload(victim)
            if slot.status == "unloaded":  # another request may have started it while we evicted
                slot.planned = decision.plan
                self._start_load(slot, startup=False)
            return
        await self._wait_for_memory(slot, deadline, decision.reason)

    async def _wait_for_memory(self, slot: ModelSlot, deadline: float, reason: str) -> None:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0 or self._n_waiting >= self.settings.load_queue:
            raise ModelOverloadedError(
                f"The model {slot.id} does not fit beside the models in use ({reason}); retry later.",
                retry_after_s=max(1, round(self.settings.load_wait_s)),
            )
        self._n_waiting += 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        finally:
            self._n_waiting -= 1

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def load(self, name: str) -> ModelSlot:
        """POST /models/{id}/load: load now (evicting idle models if need be) and wait; a failed model retries."""
        slot = self.resolve(name)
        if slot.status == "failed":
            slot.status = "unloaded"
        lease = await self.acquire(slot.id)
        lease.release()
        return slot

    def _start_load(self, slot: ModelSlot, *, startup: bool) -> None:
        assert self._loop is not None, "the fleet is not started"
        slot.begin_loading(startup=startup)
        log.info("loading model %s", slot.id)
        thread = threading.Thread(
            target=self._load_in_thread, args=(slot, self._loop), name=f"model-loader-{slot.id}", daemon=True
        )
        thread.start()

    def _load_in_thread(self, slot: ModelSlot, loop: asyncio.AbstractEventLoop) -> None:
        """The loader thread: build the engine and pick its chat template, then hand both to the event loop."""
        try:
            engine = self._builder(slot.spec, slot)
        except Exception as exc:  # a download, lookup or llama.cpp failure: reported, never the server's death
            log.error("loading the model %s failed: %s: %s", slot.id, type(exc).__name__, exc)
            _on_loop(loop, self._load_failed, slot, f"{type(exc).__name__}: {exc}")
            return
        override = Path(slot.spec.settings.chat_template) if slot.spec.settings.chat_template else None
        try:
            template = select_chat_template(engine.info, engine.vocab, override)
        except ChatTemplateError as exc:
            log.error("%s", exc)
            engine.stop()
            _on_loop(loop, self._load_failed, slot, str(exc))
            return
        if not _on_loop(loop, self._attach, slot, engine, template):
            engine.stop()

    def _attach(self, slot: ModelSlot, engine: Engine, template: Any) -> None:
        startup = slot.startup_load
        if not slot.attach(engine, template, self._clock()):
            self._spawn(asyncio.to_thread(engine.stop))
            if startup and slot.status == "failed":
                self._startup_failed(slot)
        self._pulse()

    def _load_failed(self, slot: ModelSlot, message: str) -> None:
        startup = slot.startup_load
        slot.fail(message)
        if startup:
            self._startup_failed(slot)
        self._pulse()

    def _startup_failed(self, slot: ModelSlot) -> None:
        if slot is self.default and self._on_startup_failure is not None and slot.load_error is not None:
            self._on_startup_failure(slot.load_error)

    # --- unloading --------------------------------------------------------------------------------
    async def unload(self, slot: ModelSlot) -> None:
        """Stop the model's engine and free its context and weights; requests in flight fail (admin unload)."""
        if slot.status != "ready":
            if slot.status in ("loading", "unloading"):
                await slot.settled.wait()
                await self.unload(slot)  # a load that finished meanwhile is unloaded too
            return
        engine = slot.begin_unloading()
        log.info("unloading model %s", slot.id)
        try:
            if engine is not None:
                await asyncio.to_thread(engine.stop)
        finally:
            slot.unloaded()
            self._pulse()

    async def reap(self) -> list[str]:
        """Unload every idle model whose keep_alive has run out; the ids unloaded."""
        now = self._clock()
        expired = [
            slot
            for slot in self.slots.values()
            if slot.status == "ready"
            and slot.in_flight == 0
            and slot.keep_alive_s is not None
            and now - slot.last_used >= slot.keep_alive_s
        ]
        for slot in expired:
            log.info(
                "model %s idle for %.0f s (keep_alive %.0f s): unloading",
                slot.id,
                now - slot.last_used,
                slot.keep_alive_s or 0,
            )
            await self.unload(slot)
        return [slot.id for slot in expired]

    async def _reap_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.reap()
            except Exception:  # one failed unload must not end the reaper
                log.exception("unloading idle models failed")

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _on_loop(loop: asyncio.AbstractEventLoop, callback: Callable[..., Any], *args: Any) -> bool:
    """Run callback on the event loop thread; False when the loop is already closed."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        return False
    return True
