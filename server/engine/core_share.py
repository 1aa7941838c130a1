"""The CPU cores that several engines (one per served model) share, split between those with work.

llama.cpp fixes nothing about a context's threads but the number it is told before each decode
(llama_set_n_threads), so the split can follow the load: with two models on two cores each busy engine
decodes on one core, and an engine that is alone with work (the other model idle, or finished its share of a
burst) decodes on both. A fixed split would leave half the machine idle whenever one model is (measured:
two SmolLM2 engines at 8 streams each lost ~5% of their aggregate to the moments when one had finished and the
other ran on its half). The busy engines' threads never add up to more than the cores, except for the one
step in flight while another engine becomes busy (its next step takes the smaller share).
"""

from __future__ import annotations

import threading


class CoreShare:
    """How many threads each busy engine may use now: the cores divided by the busy engines (at least one)."""

    def __init__(self, n_threads: int) -> None:
        if n_threads < 1:
            raise ValueError(f"need at least one thread to share, got {n_threads}")
        self.n_threads = n_threads
        self._busy: set[int] = set()
        self._lock = threading.Lock()  # engines claim from their own threads

    def claim(self, engine_key: int) -> int:
        """The engine has work this step: its share of the threads."""
        with self._lock:
            self._busy.add(engine_key)
            return max(1, self.n_threads // len(self._busy))

    def release(self, engine_key: int) -> None:
        """The engine has nothing to do (it waits for work): the others may use its cores."""
        with self._lock:
            self._busy.discard(engine_key)

    @property
    def n_busy(self) -> int:
        with self._lock:
            return len(self._busy)
