"""Per-request sampling parameters, as the backend's sampler chain and the scheduler need them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop. Validated by the API before it gets here."""

    max_tokens: int | None = None  # None: until end-of-generation or the slot's context is full
    temperature: float = 1.0  # 0 → greedy
    top_k: int = 0  # 0 → off
    top_p: float = 1.0  # 1 → off
    min_p: float = 0.0  # 0 → off
    seed: int | None = None  # None → a random seed per sequence
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0  # llama.cpp's multiplicative penalty; 1 → off
    penalty_last_n: int = 64  # how many recent generated tokens the penalties look at
    logit_bias: Mapping[int, float] = field(default_factory=lambda: MappingProxyType({}))
    stop: tuple[str, ...] = ()  # stop strings: generation ends before them and they are never emitted
    ignore_eos: bool = False
    logprobs: bool = False  # return the chosen token's log-probability
    top_logprobs: int = 0  # and this many alternatives per position (0..20)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0
