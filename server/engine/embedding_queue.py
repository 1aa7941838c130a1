"""The engine thread's queue of embedding work: requests in arrival order, cut into decodes.

Each request is a list of token lists (its inputs). A decode takes inputs from the front of the queue, across
requests, while they fit one embedding decode (n_seq_max inputs, n_batch tokens), so 64 concurrent one-input
requests cost one decode, like one request of 64. The engine runs at most one such decode between two chat
steps, so a running chat stream waits at most one embedding decode per token. Pure Python; every method
but `submit`'s caller side runs on the engine thread; results go back through concurrent.futures.Future,
which the asyncio side awaits (asyncio.wrap_future) and may cancel.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class EmbeddingJob:
    """One request: its inputs' tokens, the vectors computed so far, and where they go."""

    inputs: tuple[tuple[int, ...], ...]
    future: concurrent.futures.Future[list[bytes]] = field(default_factory=concurrent.futures.Future)
    vectors: list[bytes | None] = field(default_factory=list)
    n_taken: int = 0  # inputs already handed to a decode

    def __post_init__(self) -> None:
        self.vectors = [None] * len(self.inputs)


@dataclass(frozen=True)
class EmbeddingBatch:
    """What one decode embeds: (job, input index) per sequence, in order."""

    parts: tuple[tuple[EmbeddingJob, int], ...]

    @property
    def inputs(self) -> list[tuple[int, ...]]:
        return [job.inputs[index] for job, index in self.parts]

    @property
    def n_tokens(self) -> int:
        return sum(len(job.inputs[index]) for job, index in self.parts)


class EmbeddingQueue:
    def __init__(self, n_seq_max: int, n_batch: int) -> None:
        self._n_seq_max = n_seq_max
        self._n_batch = n_batch
        self._jobs: collections.deque[EmbeddingJob] = collections.deque()

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, job: EmbeddingJob) -> None:
        self._jobs.append(job)

    def next_batch(self) -> EmbeddingBatch | None:
        """The next decode's inputs, first come first served; None when nothing waits. Inputs of a cancelled
        request (its client left or timed out) are dropped. Every input fits a decode alone (the engine
        refuses longer ones at submit), so each batch takes at least one."""
        parts: list[tuple[EmbeddingJob, int]] = []
        n_tokens = 0
        for job in self._live_jobs():
            while job.n_taken < len(job.inputs) and len(parts) < self._n_seq_max:
                size = len(job.inputs[job.n_taken])
                if parts and n_tokens + size > self._n_batch:
                    return EmbeddingBatch(tuple(parts))
                parts.append((job, job.n_taken))
                job.n_taken += 1
                n_tokens += size
            if len(parts) == self._n_seq_max:
                break
        return EmbeddingBatch(tuple(parts)) if parts else None

    def _live_jobs(self) -> collections.deque[EmbeddingJob]:
        if any(job.future.cancelled() for job in self._jobs):
            self._jobs = collections.deque(job for job in self._jobs if not job.future.cancelled())
        return self._jobs

    def complete(self, batch: EmbeddingBatch, vectors: Sequence[bytes]) -> int:
        """Store a decode's vectors; resolve (and forget) every job now complete. Returns how many."""
        for (job, index), vector in zip(batch.parts, vectors, strict=True):
            job.vectors[index] = vector
        done = [job for job in self._jobs if all(vector is not None for vector in job.vectors)]
        for job in done:
            self._jobs.remove(job)
            _resolve(job.future, [vector for vector in job.vectors if vector is not None])
        return len(done)

    def fail(self, batch: EmbeddingBatch, error: BaseException) -> int:
        """A decode failed: fail the jobs that had inputs in it (the others keep their place)."""
        failed = list({id(job): job for job, _ in batch.parts}.values())
        for job in failed:
            if job in self._jobs:
                self._jobs.remove(job)
            _fail(job.future, error)
        return len(failed)

    def fail_all(self, error: BaseException) -> int:
        n_jobs = len(self._jobs)
        while self._jobs:
            _fail(self._jobs.popleft().future, error)
        return n_jobs


def _resolve(future: concurrent.futures.Future[list[bytes]], vectors: list[bytes]) -> None:
    # InvalidStateError: cancelled meanwhile by the asyncio side (client gone, timeout); nobody waits for it
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        future.set_result(vectors)


def _fail(future: concurrent.futures.Future[list[bytes]], error: BaseException) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        future.set_exception(error)
