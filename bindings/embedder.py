"""Embeddings on llama.cpp: a second context on the already-loaded model, with `embeddings` on and a pooling
type, so POST /v1/embeddings costs no second copy of the weights and never touches the chat slots' memory.

The context is sized for one embedding decode and nothing more: n_ctx = n_batch = n_ubatch tokens, one
unified KV buffer that every sequence shares (so one input may take the whole of it, or many short ones a
few cells each), up to n_seq_max inputs per decode. Each input is its own sequence, positions from 0, and
the memory is cleared before every decode, so inputs never see each other: an input's vector is the same
alone or among others up to rounding. That rounding is not nothing: llama.cpp's CPU kernels sum in an order
that depends on where a token and its KV cells sit in the batch, and the 8-bit quantization of activations
before each quantized matrix product turns such last-bit differences into visible ones. Measured on SmolLM2
(43 texts in random batches vs each alone): at most 3e-3 per component of the unit vector (cosine > 0.9999)
with flash attention off, 3e-2 with it on, because its tiled path for long batches is another kernel than
the one a short input alone gets. So this context runs without flash attention (it is small: n_ctx =
n_batch). n_ubatch = n_batch because llama.cpp pools one sequence per micro-batch: an input split over two
would be pooled from its last part only.

Pooling: what the GGUF says (`<arch>.pooling_type`: embedding models such as BERT, nomic or
Qwen3-Embedding carry one), else DEFAULT_POOLING; the caller may override it (--pooling).
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import llama_cpp.llama_cpp as llama
import numpy as np

from bindings.llama_backend import FLASH_ATTN_MODES, LlamaBackend
from bindings.llama_log import LLAMA_LOG_CALLBACK, LogCapture, failure_detail, route_llama_log
from bindings.protocol import POOLING_TYPES, BackendError, DecodeError, EmbedderInfo

logger = logging.getLogger(__name__)

# A decoder-only chat model (SmolLM2, Qwen3) has no pooling_type in its GGUF. Mean pooling is what
# sentence-transformers uses by default and what works best on models never trained for embeddings: every
# token of the input contributes, whereas the last token's state of a causal LM mostly predicts the next
# token ("last" suits models trained for it, e.g. Qwen3-Embedding, whose GGUF says so).
DEFAULT_POOLING = "mean"
DEFAULT_MAX_SEQUENCES = 64  # inputs in one decode: 64 short texts go through in one call
# Recurrent and hybrid models (Qwen3-Next) keep a fixed state per sequence (75 MiB for Qwen3-Next), so their
# embedding context holds fewer sequences.
RECURRENT_MAX_SEQUENCES = 4

POOLING_CODES: Mapping[str, int] = MappingProxyType(
    {"mean": llama.LLAMA_POOLING_TYPE_MEAN, "cls": llama.LLAMA_POOLING_TYPE_CLS, "last": llama.LLAMA_POOLING_TYPE_LAST}
)
_GGUF_POOLING_NAMES: Mapping[int, str] = MappingProxyType({code: name for name, code in POOLING_CODES.items()})


@dataclass(frozen=True)
class EmbedderConfig:
    pooling: str | None = None  # one of POOLING_TYPES; None: the GGUF's, else DEFAULT_POOLING
    n_batch: int = 512  # tokens in one embedding decode, and so the longest input
    max_sequences: int = DEFAULT_MAX_SEQUENCES
    n_threads: int | None = None  # None: every CPU this process may run on
    flash_attn: str = "off"  # off: 10x less dependence of a vector on its batch mates (module docstring)

    def __post_init__(self) -> None:
        if self.pooling is not None and self.pooling not in POOLING_TYPES:
            raise ValueError(f"pooling must be one of {', '.join(POOLING_TYPES)}, got {self.pooling!r}")
        if self.n_batch < 1 or self.max_sequences < 1:
            raise ValueError("n_batch and max_sequences must be at least 1")
        if self.flash_attn not in FLASH_ATTN_MODES:
            raise ValueError(f"flash_attn must be one of {', '.join(FLASH_ATTN_MODES)}, got {self.flash_attn!r}")


def _meta_int(model: Any, key: str) -> int | None:
    buffer = ctypes.create_string_buffer(64)
    if llama.llama_model_meta_val_str(model, key.encode(), buffer, len(buffer)) < 0:
        return None
    try:
        return int(buffer.value.decode())
    except ValueError:
        return None


def gguf_pooling(model: Any) -> str | None:
    """The pooling the GGUF asks for (`<arch>.pooling_type`), or None where it names none (or none/rank)."""
    buffer = ctypes.create_string_buffer(128)
    if llama.llama_model_meta_val_str(model, b"general.architecture", buffer, len(buffer)) < 0:
        return None
    code = _meta_int(model, f"{buffer.value.decode()}.pooling_type")
    return None if code is None else _GGUF_POOLING_NAMES.get(code)


def context_shape(n_batch: int, max_sequences: int) -> tuple[int, int]:
    """(n_batch, n_seq_max) of the embedding context: n_seq_max the largest power of two up to max_sequences
    that divides n_batch. llama.cpp reserves its worst-case graph with n_batch / n_seq_max tokens per sequence
    and aborts (GGML_ASSERT in ggml_mul_mat) when that is not whole. An odd n_batch loses one token, so that
    at least two inputs share a decode."""
    if n_batch > 2:
        n_batch -= n_batch % 2
    n_sequences = 1
    while n_sequences * 2 <= max_sequences and n_batch % (n_sequences * 2) == 0:
        n_sequences *= 2
    return n_batch, n_sequences


class LlamaEmbedder:
    """The Embedder protocol over a second llama.cpp context. Close it before the backend that owns the model."""

    def __init__(self, backend: LlamaBackend, config: EmbedderConfig) -> None:
        self._ctx: Any = None
        self._batch: llama.llama_batch | None = None
        self._log_capture = LogCapture(logger)
        self._log_capture_ref = ctypes.py_object(self._log_capture)
        self._log_user_data = ctypes.cast(ctypes.pointer(self._log_capture_ref), ctypes.c_void_p)
        self._closed = False
        model = backend.model_handle
        self._backend = backend  # keeps the model alive as long as this context
        pooling = config.pooling or gguf_pooling(model) or DEFAULT_POOLING
        limit = min(config.max_sequences, llama.llama_max_parallel_sequences())
        if llama.llama_model_is_recurrent(model) or llama.llama_model_is_hybrid(model):
            limit = min(limit, RECURRENT_MAX_SEQUENCES)
        n_batch, n_sequences = context_shape(config.n_batch, limit)
        try:
            self._ctx = self._create_context(model, config, pooling, n_batch, n_sequences)
            self._memory = llama.llama_get_memory(self._ctx)
            n_batch = llama.llama_n_batch(self._ctx)
            self._info = EmbedderInfo(
                n_embd=llama.llama_model_n_embd_out(model),
                n_ctx=n_batch,
                n_batch=n_batch,
                n_seq_max=llama.llama_n_seq_max(self._ctx),
                pooling=pooling,
            )
            self._batch = llama.llama_batch_init(n_batch, 0, 1)
            self._tokens = np.ctypeslib.as_array(self._batch.token, shape=(n_batch,))
            self._positions = np.ctypeslib.as_array(self._batch.pos, shape=(n_batch,))
            np.ctypeslib.as_array(self._batch.n_seq_id, shape=(n_batch,))[:] = 1
            np.ctypeslib.as_array(self._batch.logits, shape=(n_batch,))[:] = 1  # pooling needs every token's state
            self._seq_ids = [self._batch.seq_id[index] for index in range(n_batch)]
        except BaseException:
            self.close()
            raise
        logger.info(
            "embeddings: %s pooling, %d dimensions, up to %d inputs and %d tokens per decode",
            pooling,
            self._info.n_embd,
            self._info.n_seq_max,
            self._info.n_batch,
        )

    def _create_context(self, model: Any, config: EmbedderConfig, pooling: str, n_batch: int, n_sequences: int) -> Any:
        n_threads = config.n_threads or (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        )
        params = llama.llama_context_default_params()
        params.n_ctx = n_batch
        params.n_batch = n_batch
        params.n_ubatch = n_batch  # one micro-batch per decode: see the module docstring
        params.n_seq_max = n_sequences
        params.kv_unified = True  # one buffer all sequences share; split per sequence, each would get n_ctx/64
        params.embeddings = True
        params.pooling_type = POOLING_CODES[pooling]
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.flash_attn_type = FLASH_ATTN_MODES[config.flash_attn]
        params.no_perf = True
        self._route_log_here()
        self._log_capture.drain()
        ctx = llama.llama_init_from_model(model, params)
        if not ctx:
            raise BackendError(f"cannot create the embedding context: {failure_detail(self._log_capture.drain())}")
        return ctx

    @property
    def info(self) -> EmbedderInfo:
        return self._info

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[bytes]:
        if self._closed:
            raise BackendError("the embedder is closed")
        n_tokens = self._fill_batch(inputs)
        llama.llama_memory_clear(self._memory, True)  # nothing of the previous decode may be attended to
        self._route_log_here()
        self._log_capture.drain()
        status = llama.llama_decode(self._ctx, self._batch)
        if status != 0:
            detail = failure_detail(self._log_capture.drain())
            raise DecodeError(f"embedding decode of {n_tokens} tokens failed with {status}: {detail}")
        return [self._pooled(seq_id) for seq_id in range(len(inputs))]

    def _fill_batch(self, inputs: Sequence[Sequence[int]]) -> int:
        n_tokens = sum(len(tokens) for tokens in inputs)
        if not inputs or any(not tokens for tokens in inputs):
            raise DecodeError("every input needs at least one token")
        if len(inputs) > self._info.n_seq_max or n_tokens > self._info.n_batch:
            raise DecodeError(
                f"{len(inputs)} inputs of {n_tokens} tokens exceed one embedding decode "
                f"({self._info.n_seq_max} inputs, {self._info.n_batch} tokens)"
            )
        start = 0
        try:
            for seq_id, tokens in enumerate(inputs):
                end = start + len(tokens)
                self._tokens[start:end] = tokens
                self._positions[start:end] = np.arange(len(tokens))
                for seq_ids in self._seq_ids[start:end]:
                    seq_ids[0] = seq_id
                start = end
        except (OverflowError, ValueError) as exc:
            raise DecodeError(f"a token id does not fit llama.cpp's int32: {exc}") from exc
        assert self._batch is not None
        self._batch.n_tokens = n_tokens
        return n_tokens

    def _pooled(self, seq_id: int) -> bytes:
        pointer = llama.llama_get_embeddings_seq(self._ctx, seq_id)
        if not pointer:
            raise DecodeError(f"llama.cpp returned no pooled embedding for sequence {seq_id}")
        vector = np.ctypeslib.as_array(pointer, shape=(self._info.n_embd,))
        return vector.astype("<f4", copy=False).tobytes()

    def _route_log_here(self) -> None:
        """llama.cpp's log is process-wide: take it over before the calls whose failure quotes it."""
        route_llama_log(self._log_user_data)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._batch is not None:
            llama.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama.llama_free(self._ctx)
            self._ctx = None
        current_callback = llama.llama_log_callback()
        current_user_data = ctypes.c_void_p()
        llama.llama_log_get(ctypes.byref(current_callback), ctypes.byref(current_user_data))
        if current_user_data.value == self._log_user_data.value:
            llama.llama_log_set(LLAMA_LOG_CALLBACK, ctypes.c_void_p(None))

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()
