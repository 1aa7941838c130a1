"""A small draft model for speculative decoding (`--spec-type draft --draft-model PATH`): a second llama_model
with its own small context, one sequence per target slot, drafting greedily (a point-mass proposal, which keeps
the target's sampling exact: server/engine/speculation.py).

The draft context's KV follows the target's accepted tokens lazily: each call compares what a slot's draft
sequence holds with the target sequence so far (prompt + output), cuts the draft sequence back to their common
prefix (the rejected drafts go, the accepted ones stay), decodes what it lacks (all slots in one batch), then
drafts k tokens in k small decodes of every drafting slot together. A new request on a slot reuses whatever
prefix its draft sequence shares with the new prompt, as the target does. The draft model must be able to cut a
sequence back (no recurrent / hybrid draft models) and share the target's vocabulary.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp.llama_cpp as llama
import numpy as np

from bindings.llama_log import LLAMA_LOG_CALLBACK, LogCapture, failure_detail, route_llama_log
from bindings.protocol import BackendError, BatchEntry, DraftRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DraftModelConfig:
    n_slots: int  # the target's slots: one draft sequence each
    n_ctx_per_slot: int  # the target's context per slot
    n_batch: int = 256  # most tokens per draft decode (catching up a new prompt takes several)
    n_threads: int | None = None
    use_extra_bufts: bool = False  # see bufts_probe.py: the target's verdict applies here too
    n_gpu_layers: int = -1


class LlamaDraftModel:
    """The Drafter protocol over a second llama.cpp model. Engine thread only; call close() when done."""

    name = "draft"

    def __init__(self, model_path: Path, config: DraftModelConfig, *, target_n_vocab: int) -> None:
        self._closed = False
        self._model: Any = None
        self._ctx: Any = None
        self._batch: Any = None
        self._config = config
        self._log_capture = LogCapture(logger)
        self._log_capture_ref = ctypes.py_object(self._log_capture)
        self._log_user_data = ctypes.cast(ctypes.pointer(self._log_capture_ref), ctypes.c_void_p)
        llama.llama_backend_init()
        llama.llama_log_set(LLAMA_LOG_CALLBACK, self._log_user_data)
        try:
            self._load(Path(model_path))
            self._check(Path(model_path), target_n_vocab)
        except BaseException:
            self.close()
            raise
        self._cached: list[list[int]] = [[] for _ in range(config.n_slots)]  # what each draft sequence holds
        logger.info("draft model %s: %d slots, batch %d", Path(model_path).name, config.n_slots, config.n_batch)

    def _load(self, model_path: Path) -> None:
        if not model_path.is_file():
            raise BackendError(f"draft model file {model_path} does not exist")
        config = self._config
        params = llama.llama_model_default_params()
        params.n_gpu_layers = config.n_gpu_layers
        params.use_extra_bufts = config.use_extra_bufts
        self._model = llama.llama_model_load_from_file(os.fsencode(model_path), params)
        if not self._model:
            raise BackendError(f"cannot load draft model {model_path}: {failure_detail(self._log_capture.drain())}")
        n_threads = config.n_threads or len(os.sched_getaffinity(0))
        cparams = llama.llama_context_default_params()
        cparams.n_ctx = config.n_slots * config.n_ctx_per_slot
        cparams.n_seq_max = config.n_slots
        cparams.n_batch = cparams.n_ubatch = config.n_batch
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.no_perf = True
        self._ctx = llama.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            detail = failure_detail(self._log_capture.drain())
            raise BackendError(f"cannot create the draft model's context: {detail}")
        self._memory = llama.llama_get_memory(self._ctx)
        self._vocab = llama.llama_model_get_vocab(self._model)
        self._n_vocab = llama.llama_vocab_n_tokens(self._vocab)
        self._batch = llama.llama_batch_init(config.n_batch, 0, 1)

    def _check(self, model_path: Path, target_n_vocab: int) -> None:
        if llama.llama_model_is_recurrent(self._model) or llama.llama_model_is_hybrid(self._model):
            raise BackendError(f"draft model {model_path.name} is recurrent/hybrid: its drafts cannot be cut back")
        if self._n_vocab != target_n_vocab:
            raise BackendError(
                f"draft model {model_path.name} has {self._n_vocab} tokens, the served model {target_n_vocab}: "
                "a draft model must share the served model's vocabulary"
            )

    # --- Drafter protocol ----------------------------------------------------------------------------
    def draft(self, requests: Sequence[DraftRequest]) -> list[tuple[int, ...]]:
        if self._closed:
            raise BackendError("the draft model is closed")
        route_llama_log(self._log_user_data)
        rows = self._catch_up(requests)
        drafts: list[list[int]] = [[] for _ in requests]
        active = list(range(len(requests)))
        while active:
            next_tokens = []
            for i in active:
                token = int(self._logits(rows[i]).argmax())
                drafts[i].append(token)
                if len(drafts[i]) < requests[i].n_max and not llama.llama_vocab_is_eog(self._vocab, token):
                    next_tokens.append(i)
            active = next_tokens
            if active:
                rows = self._decode_next(requests, drafts, active, rows)
        return [tuple(draft) for draft in drafts]

    def forget(self, key: int) -> None:
        """Nothing to drop: a slot's draft sequence stays, as a prefix the next request there may share."""

    def observe(self, entries: Sequence[BatchEntry]) -> None:
        """Nothing to take: each draft() call catches the draft sequences up from the target's tokens."""

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
        if self._model:
            llama.llama_model_free(self._model)
            self._model = None
        self._release_log_capture()

    def _release_log_capture(self) -> None:
        """Point llama.cpp's (process-wide) log away from this object's capture if it still points here."""
        current_callback = llama.llama_log_callback()
        current_user_data = ctypes.c_void_p()
        llama.llama_log_get(ctypes.byref(current_callback), ctypes.byref(current_user_data))
        if current_user_data.value == self._log_user_data.value:
            llama.llama_log_set(LLAMA_LOG_CALLBACK, ctypes.c_void_p(None))

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()

    # --- decoding ------------------------------------------------------------------------------------
    def _catch_up(self, requests: Sequence[DraftRequest]) -> dict[int, int]:
        """Cut every request's draft sequence back to what it shares with the target's, decode the rest (in
        n_batch chunks, slots together); the batch row of each request's last token's logits, by request."""
        pending: list[tuple[int, int, list[int], int]] = []  # (request index, slot, tokens, start position)
        for i, request in enumerate(requests):
            history = [*request.prompt, *request.output]
            cached = self._cached[request.slot]
            n_keep = min(_common_prefix(cached, history), len(history) - 1)  # the last token's logits are needed
            if n_keep < len(cached):
                if not llama.llama_memory_seq_rm(self._memory, request.slot, n_keep, -1):
                    raise BackendError(f"draft model: cannot cut slot {request.slot} back to {n_keep} tokens")
                del cached[n_keep:]
            pending.append((i, request.slot, history[n_keep:], n_keep))
        rows: dict[int, int] = {}
        while pending:
            pending = self._decode_chunk(pending, rows)
        return rows

    def _decode_chunk(
        self, pending: list[tuple[int, int, list[int], int]], rows: dict[int, int]
    ) -> list[tuple[int, int, list[int], int]]:
        """One decode of as much of `pending` as fits n_batch; what is left over."""
        entries: list[tuple[int, int, list[int], int, bool]] = []
        left: list[tuple[int, int, list[int], int]] = []
        room = self._config.n_batch
        for i, slot, tokens, start in pending:
            n = min(room, len(tokens))
            if n == 0:
                left.append((i, slot, tokens, start))
                continue
            entries.append((i, slot, tokens[:n], start, n == len(tokens)))
            if n < len(tokens):
                left.append((i, slot, tokens[n:], start + n))
            room -= n
        self._decode(entries, rows)
        return left

    def _decode_next(
        self, requests: Sequence[DraftRequest], drafts: list[list[int]], active: list[int], rows: dict[int, int]
    ) -> dict[int, int]:
        """Feed each active request's newest draft token back; the rows of their next logits."""
        entries = []
        for i in active:
            slot = requests[i].slot
            entries.append((i, slot, [drafts[i][-1]], len(self._cached[slot]), True))
        rows = dict(rows)
        self._decode(entries, rows)
        return rows

    def _decode(self, entries: list[tuple[int, int, list[int], int, bool]], rows: dict[int, int]) -> None:
        """One llama_decode of (request index, slot, tokens, start, logits at the end?) entries."""
        batch = self._batch
        n = 0
        for i, slot, tokens, start, wants_logits in entries:
            for offset, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = start + offset
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot
                batch.logits[n] = wants_logits and offset == len(tokens) - 1
                n += 1
            if wants_logits:
                rows[i] = n - 1
            self._cached[slot].extend(tokens)
        batch.n_tokens = n
        status = llama.llama_decode(self._ctx, batch)
        if status != 0:
            for _, slot, _, _, _ in entries:  # what the failed decode left in these sequences is unknown
                llama.llama_memory_seq_rm(self._memory, slot, -1, -1)
                self._cached[slot] = []
            raise BackendError(f"draft model: llama_decode failed with {status}")

    def _logits(self, row: int) -> np.ndarray:
        pointer = llama.llama_get_logits_ith(self._ctx, row)
        if not pointer:
            raise BackendError(f"draft model: no logits at batch row {row}")
        return np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))


def _common_prefix(cached: list[int], history: list[int]) -> int:
    if len(cached) <= len(history) and cached == history[: len(cached)]:
        return len(cached)  # the usual case, compared in C
    n = 0
    for a, b in zip(cached, history, strict=False):
        if a != b:
            break
        n += 1
    return n
