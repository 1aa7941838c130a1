"""A deterministic stand-in for the llama.cpp embedding context (bindings/embedder.py): same protocol, no model.

An input's vector is the mean of one pseudo-random vector per (token, position), so it depends only on the
input itself, never on what shares the decode. It checks the limits of one decode as llama.cpp would, records
every decode (and how many chat decodes the FakeBackend had run before it, so tests can see the two
interleave), and can inject failures and delays.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bindings.protocol import DecodeError, EmbedderInfo
from server.engine.fake_backend import FakeBackend


@dataclass(frozen=True)
class FakeEmbedderConfig:
    n_embd: int = 16
    n_batch: int = 64
    n_seq_max: int = 8
    pooling: str = "mean"
    delay_s: float = 0.0  # sleep inside each decode, to make interleaving with chat steps observable
    fail_on_token: int | None = None  # embed raises DecodeError when an input holds this token


class FakeEmbedder:
    def __init__(self, config: FakeEmbedderConfig | None = None, *, backend: FakeBackend | None = None) -> None:
        self.config = config or FakeEmbedderConfig()
        self._backend = backend
        self._info = EmbedderInfo(
            n_embd=self.config.n_embd,
            n_ctx=self.config.n_batch,
            n_batch=self.config.n_batch,
            n_seq_max=self.config.n_seq_max,
            pooling=self.config.pooling,
        )
        self.batches: list[tuple[tuple[int, ...], ...]] = []  # every decode's inputs
        self.chat_decodes_before: list[int] = []  # FakeBackend.n_decode_calls when each embedding decode ran
        self.closed = False

    @property
    def info(self) -> EmbedderInfo:
        return self._info

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[bytes]:
        if self.config.delay_s:
            time.sleep(self.config.delay_s)
        n_tokens = sum(len(tokens) for tokens in inputs)
        if not inputs or len(inputs) > self.config.n_seq_max or n_tokens > self.config.n_batch:
            raise DecodeError(f"{len(inputs)} inputs of {n_tokens} tokens do not fit one embedding decode")
        if self.config.fail_on_token is not None and any(self.config.fail_on_token in tokens for tokens in inputs):
            raise DecodeError("injected embedding failure")
        self.batches.append(tuple(tuple(tokens) for tokens in inputs))
        self.chat_decodes_before.append(self._backend.n_decode_calls if self._backend is not None else 0)
        return [self.vector(tokens).astype("<f4").tobytes() for tokens in inputs]

    def vector(self, tokens: Sequence[int]) -> np.ndarray:
        """The pooled, unnormalized vector of one input (what the tests compare against)."""
        rows = np.stack([self._token_vector(token, position) for position, token in enumerate(tokens)])
        pooled: np.ndarray = rows.mean(axis=0).astype(np.float32)
        return pooled

    def _token_vector(self, token: int, position: int) -> np.ndarray:
        rng = np.random.default_rng(zlib.crc32(np.asarray([token, position], dtype=np.int64).tobytes()))
        return rng.normal(0.0, 1.0, self.config.n_embd)

    def close(self) -> None:
        self.closed = True
