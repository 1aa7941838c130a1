"""llama.cpp behind the engine's Backend protocol. The ONLY module that imports the llama.cpp bindings.

One model, one context with `n_seq_max` = number of slots, one preallocated `llama_batch` refilled every
step, one `llama_sampler` chain per sampler id. It also reads back what llama.cpp says it allocated
(`memory_report()`, see memory_report.py) and places tensors on devices by regex (`tensor_overrides`, like
llama.cpp's `-ot`, through ggml's device registry in devices.py).

Every method is meant for the engine thread, except the Vocab ones (tokenize, piece, is_eog, token_text),
which only read the vocabulary and may be called from any thread while the backend is open.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import llama_cpp.llama_cpp as llama
import numpy as np
import numpy.typing as npt

from bindings.constrained import SHORTLIST, Candidates, ConstrainedPlan, GrammarGate, sample_constrained
from bindings.devices import GgmlDevices, buffer_type_overrides
from bindings.gil_holding import gil_holding
from bindings.llama_log import LLAMA_LOG_CALLBACK, LogCapture, failure_detail, route_llama_log
from bindings.memory_report import MemoryReport, parse_memory_report
from bindings.protocol import (
    BackendError,
    BatchEntry,
    CacheOp,
    DecodeError,
    ModelInfo,
    SampledToken,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
)

logger = logging.getLogger(__name__)

KV_CACHE_TYPES: Mapping[str, int] = MappingProxyType(
    {
        "f32": llama.GGML_TYPE_F32,
        "f16": llama.GGML_TYPE_F16,
        "q8_0": llama.GGML_TYPE_Q8_0,
        "q4_0": llama.GGML_TYPE_Q4_0,
    }
)
FLASH_ATTN_MODES: Mapping[str, int] = MappingProxyType(
    {
        "auto": llama.LLAMA_FLASH_ATTN_TYPE_AUTO,
        "on": llama.LLAMA_FLASH_ATTN_TYPE_ENABLED,
        "off": llama.LLAMA_FLASH_ATTN_TYPE_DISABLED,
    }
)
CACHE_OP_KINDS: frozenset[str] = frozenset(
    {"clear", "truncate", "save", "restore", "copy", "stash", "load", "drop", "checkpoint", "rollback"}
)

# llama_decode's return codes (llama.h).
_DECODE_ERRORS: Mapping[int, str] = MappingProxyType(
    {
        1: "no room in the KV cache for this batch (the context is full)",
        2: "the decode was aborted",
        -1: "invalid input batch",
    }
)
_GGML_BACKEND_DEVICE_TYPE_CPU = 0

# The address of a batch index's logits row (0 where the decode produced none), keeping the GIL.
_logits_row_address = gil_holding(llama.llama_get_logits_ith, ctypes.c_void_p)


@dataclass(frozen=True)
class LlamaBackendConfig:
    """How to load the model and size the context. Defaults are llama.cpp's where it has one."""

    n_slots: int = 4  # sequences in the context (n_seq_max)
    n_ctx_per_slot: int = 4096  # positions per slot asked for; llama.cpp pads each share to 256
    n_batch: int = 512  # most tokens in one llama_decode
    n_ubatch: int = 512  # most tokens in one compute pass
    n_threads: int | None = None  # None: every CPU this process may run on
    n_threads_batch: int | None = None  # None: same as n_threads
    use_extra_bufts: bool = False  # weight repacking / AMX buffers (see bufts_probe.py before turning on)
    n_gpu_layers: int = -1  # layers in GPU memory; negative: all (no effect on a CPU-only build)
    tensor_overrides: tuple[tuple[str, str], ...] = ()  # (regex on tensor names, device name) like -ot
    tensor_split: tuple[float, ...] = ()  # share of layers per GPU (llama.cpp -ts); empty: llama.cpp decides
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: str = "auto"
    use_mmap: bool = True
    use_mlock: bool = False
    kv_unified: bool = False  # one KV buffer for all slots; measured 2-9% slower here
    offload_kqv: bool = True  # KV cache and attention on the GPU that holds the layer
    op_offload: bool = True  # run ops on host-resident weights on the GPU for large batches
    # Load Qwen3-Next's MTP block too (`blk.N.nextn.*`, skipped otherwise) for --spec-type mtp; the model must
    # declare one (`<arch>.nextn_predict_layers`). The trunk's outputs are the same either way (docs/mtp.md).
    load_mtp: bool = False

    def __post_init__(self) -> None:
        for field_name in ("n_slots", "n_ctx_per_slot", "n_batch", "n_ubatch"):
            if getattr(self, field_name) < 1:
                raise ValueError(f"{field_name} must be at least 1, got {getattr(self, field_name)}")
        if self.n_ubatch > self.n_batch:
            raise ValueError(f"n_ubatch ({self.n_ubatch}) must not exceed n_batch ({self.n_batch})")
        for field_name in ("n_threads", "n_threads_batch"):
            value = getattr(self, field_name)
            if value is not None and value < 1:
                raise ValueError(f"{field_name} must be at least 1 (or None for all CPUs), got {value}")
        for field_name in ("type_k", "type_v"):
            if getattr(self, field_name) not in KV_CACHE_TYPES:
                known = ", ".join(KV_CACHE_TYPES)
                raise ValueError(f"{field_name} must be one of {known}, got {getattr(self, field_name)!r}")
        if self.flash_attn not in FLASH_ATTN_MODES:
            raise ValueError(f"flash_attn must be one of {', '.join(FLASH_ATTN_MODES)}, got {self.flash_attn!r}")
        for pattern, device in self.tensor_overrides:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"tensor override pattern {pattern!r} is not a valid regex: {exc}") from exc
            if not device:
                raise ValueError(f"tensor override {pattern!r} names no device")


def _default_thread_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _biased(logits: npt.NDArray[np.float32], biases: _GreedyBiases) -> npt.NDArray[np.float32]:
    """The logits as a chain's logit-bias stage leaves them (a copy only when some bias applies)."""
    if not biases.tokens:
        return logits
    biased = logits.copy()
    biased[biases.token_array] += biases.bias_array
    return biased


def _load_mode(use_mmap: bool, use_mlock: bool) -> int:
    if use_mmap:
        return llama.LLAMA_LOAD_MODE_MMAP_MLOCK if use_mlock else llama.LLAMA_LOAD_MODE_MMAP
    return llama.LLAMA_LOAD_MODE_MLOCK if use_mlock else llama.LLAMA_LOAD_MODE_NONE


def _tensor_split_array(shares: Sequence[float]) -> Any:
    """llama_model_params.tensor_split: a float array of llama_max_devices() entries (zeros: unused)."""
    n_devices = llama.llama_max_devices()
    if len(shares) > n_devices:
        raise BackendError(f"tensor_split names {len(shares)} devices; this llama.cpp supports {n_devices}")
    return (ctypes.c_float * n_devices)(*shares)


def supports_gpu_offload() -> bool:
    """Whether this llama.cpp build can put layers on a GPU (a CPU-only build cannot)."""
    return bool(llama.llama_supports_gpu_offload())


def llama_system_info() -> str:
    """llama.cpp's build features (SIMD, AMX, REPACK, ...) as it prints them."""
    return (llama.llama_print_system_info() or b"").decode(errors="replace").strip()


@dataclass(frozen=True)
class _GreedyBiases:
    """The non-positive logit biases of a greedy sampler, as a set for lookups and as arrays to apply."""

    tokens: frozenset[int]
    token_array: npt.NDArray[np.intp]
    bias_array: npt.NDArray[np.float32]


class LlamaBackend:
    """The Backend protocol over llama.cpp's C API. Call close() when done (also on the error path)."""

    def __init__(self, model_path: Path, config: LlamaBackendConfig, *, name: str | None = None) -> None:
        self._closed = False
        self._model: Any = None
        self._ctx: Any = None
        self._batch: llama.llama_batch | None = None
        self._samplers: dict[int, Any] = {}
        self._greedy_biases: dict[int, _GreedyBiases] = {}  # samplers whose chain is an argmax (see _greedy_token)
        self._grammars: dict[int, GrammarGate] = {}  # kept out of the chains: checked token-first (constrained.py)
        # top-k samplers with a grammar and no penalties: the biases their shortlist is ranked by, and their k
        self._shortlists: dict[int, tuple[_GreedyBiases, int]] = {}
        self._candidates: Candidates | None = None  # the full-vocabulary candidate array, made on first use
        self._saved_states: dict[int, tuple[bytearray, int]] = {}  # per-slot snapshots ("save"/"restore")
        self._prompt_cache: dict[int, tuple[bytearray, int]] = {}  # stashed states by entry id ("stash"/"load")
        self._checkpoints: dict[int, tuple[bytearray, int]] = {}  # per-slot recurrent states ("checkpoint")
        self._output_indices: frozenset[int] = frozenset()  # batch indices with logits, last decode
        self._pending_output_indices: frozenset[int] = frozenset()  # those of the batch being decoded
        # Prompt logprobs: (slot, first batch index, targets, top-N) of the batch being decoded, and the
        # logprobs of the last decode by slot (computed right after it: llama.cpp's logits of a chunk are
        # overwritten by the next decode, and nothing here keeps n_vocab floats per position).
        self._pending_prompt_targets: list[tuple[int, int, tuple[int, ...], int]] = []
        self._prompt_logprobs: dict[int, tuple[TokenLogprob, ...]] = {}
        self._config = config
        model_path = Path(model_path)
        if not model_path.is_file():
            raise BackendError(f"model file {model_path} does not exist")
        llama.llama_backend_init()  # idempotent: it only initialises ggml's timer and tables
        # Resolve devices before loading anything: an unknown device must fail fast and cleanly.
        self._buft_overrides = buffer_type_overrides(config.tensor_overrides, GgmlDevices())
        self._tensor_split = _tensor_split_array(config.tensor_split)  # kept alive for the model's lifetime
        self._log_capture = LogCapture(logger)
        self._log_capture_ref = ctypes.py_object(self._log_capture)  # what user_data points at
        self._log_user_data = ctypes.cast(ctypes.pointer(self._log_capture_ref), ctypes.c_void_p)
        self._route_log_here()
        try:
            self._model = self._load_model(model_path)
            self._ctx = self._create_context(model_path)
            self._memory_report = parse_memory_report(self._log_capture.drain())
            self._vocab = llama.llama_model_get_vocab(self._model)
            self._n_vocab = llama.llama_vocab_n_tokens(self._vocab)
            self._logits_row_type = ctypes.c_float * self._n_vocab
            self._pieces = self._read_pieces()
            self._eog_tokens = frozenset(t for t in range(self._n_vocab) if llama.llama_vocab_is_eog(self._vocab, t))
            self._info = self._read_info(model_path, name)
            self._batch = llama.llama_batch_init(self._info.n_batch, 0, config.n_slots)
            self._init_batch_views(self._info.n_batch)
            self._memory = llama.llama_get_memory(self._ctx)
        except BaseException:
            self.close()
            raise
        logger.info(
            "loaded %s: %d slots x %d positions, batch %d, extra bufts %s",
            self._info.name,
            self._info.n_slots,
            self._info.n_ctx_per_slot,
            self._info.n_batch,
            "on" if config.use_extra_bufts else "off",
        )

    # --- loading ---------------------------------------------------------------------------------------

    def _load_model(self, model_path: Path) -> Any:
        config = self._config
        params = llama.llama_model_default_params()
        params.n_gpu_layers = config.n_gpu_layers
        params.load_mode = _load_mode(config.use_mmap, config.use_mlock)
        params.use_extra_bufts = config.use_extra_bufts
        if config.tensor_overrides:
            params.tensor_buft_overrides = ctypes.cast(self._buft_overrides, ctypes.c_void_p).value
        if config.tensor_split:
            params.tensor_split = self._tensor_split
        params.load_mtp = config.load_mtp
        model = llama.llama_model_load_from_file(os.fsencode(model_path), params)
        if not model:
            detail = failure_detail(self._log_capture.drain())
            raise BackendError(f"cannot load model {model_path}: {detail}")
        if config.load_mtp and llama.llama_model_n_layer_nextn(model) < 1:
            llama.llama_model_free(model)
            raise BackendError(
                f"model {model_path} has no multi-token-prediction (MTP) head (no nextn_predict_layers: not a "
                "Qwen3-Next GGUF, or converted with --no-mtp), so --spec-type mtp cannot draft with it"
            )
        return model

    def _create_context(self, model_path: Path) -> Any:
        config = self._config
        n_threads = config.n_threads or _default_thread_count()
        if config.n_slots > llama.llama_max_parallel_sequences():
            raise BackendError(
                f"n_slots={config.n_slots} exceeds llama.cpp's limit of "
                f"{llama.llama_max_parallel_sequences()} sequences per context"
            )
        params = llama.llama_context_default_params()
        params.n_ctx = config.n_slots * config.n_ctx_per_slot
        params.n_seq_max = config.n_slots
        params.n_batch = config.n_batch
        params.n_ubatch = config.n_ubatch
        params.n_threads = n_threads
        params.n_threads_batch = config.n_threads_batch or n_threads
        params.type_k = KV_CACHE_TYPES[config.type_k]
        params.type_v = KV_CACHE_TYPES[config.type_v]
        params.flash_attn_type = FLASH_ATTN_MODES[config.flash_attn]
        params.kv_unified = config.kv_unified
        params.offload_kqv = config.offload_kqv
        params.op_offload = config.op_offload
        params.no_perf = True
        ctx = llama.llama_init_from_model(self._model, params)
        if not ctx:
            detail = failure_detail(self._log_capture.drain())
            raise BackendError(f"cannot create a llama.cpp context for {model_path}: {detail}")
        return ctx

    def _read_pieces(self) -> tuple[bytes, ...]:
        """Every token's output bytes, read once so the per-token path is a tuple lookup."""
        buffer = ctypes.create_string_buffer(256)
        pieces = []
        for token in range(self._n_vocab):
            n_bytes = llama.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
            if n_bytes < 0:
                buffer = ctypes.create_string_buffer(-n_bytes)
                n_bytes = llama.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
            pieces.append(buffer.raw[:n_bytes])
        return tuple(pieces)

    def _meta_str(self, key: str) -> str | None:
        buffer = ctypes.create_string_buffer(512)
        n_bytes = llama.llama_model_meta_val_str(self._model, key.encode(), buffer, len(buffer))
        if n_bytes < 0:
            return None
        if n_bytes >= len(buffer):
            buffer = ctypes.create_string_buffer(n_bytes + 1)
            llama.llama_model_meta_val_str(self._model, key.encode(), buffer, len(buffer))
        return buffer.value.decode(errors="replace")

    def _read_info(self, model_path: Path, name: str | None) -> ModelInfo:
        model, vocab = self._model, self._vocab
        chat_template = llama.llama_model_chat_template(model, None)
        bos, eos = llama.llama_vocab_bos(vocab), llama.llama_vocab_eos(vocab)
        partial_removal = not (llama.llama_model_is_recurrent(model) or llama.llama_model_is_hybrid(model))
        return ModelInfo(
            name=name or model_path.stem,
            architecture=self._meta_str("general.architecture") or "unknown",
            n_vocab=self._n_vocab,
            n_ctx_train=llama.llama_model_n_ctx_train(model),
            n_slots=llama.llama_n_seq_max(self._ctx),
            n_ctx_per_slot=llama.llama_n_ctx_seq(self._ctx),
            n_batch=llama.llama_n_batch(self._ctx),
            supports_partial_removal=partial_removal,
            bos_token=bos if bos >= 0 else None,
            eos_token=eos if eos >= 0 else None,
            add_bos=bool(llama.llama_vocab_get_add_bos(vocab)),
            chat_template=chat_template.decode(errors="replace") if chat_template else None,
            n_params=llama.llama_model_n_params(model),
            size_bytes=llama.llama_model_size(model),
        )

    def _init_batch_views(self, n_batch: int) -> None:
        """numpy views over the batch's C arrays, so refilling a step is a few slice assignments."""
        assert self._batch is not None
        batch = self._batch
        self._batch_tokens = np.ctypeslib.as_array(batch.token, shape=(n_batch,))
        self._batch_positions = np.ctypeslib.as_array(batch.pos, shape=(n_batch,))
        self._batch_output_flags = np.ctypeslib.as_array(batch.logits, shape=(n_batch,))
        np.ctypeslib.as_array(batch.n_seq_id, shape=(n_batch,))[:] = 1  # one sequence per token, always
        # seq_id is an array of per-token arrays; each token's first entry is its slot.
        self._batch_seq_ids = [batch.seq_id[index] for index in range(n_batch)]

    # --- Backend protocol --------------------------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        return self._info

    def memory_report(self) -> MemoryReport:
        return self._memory_report

    @property
    def model_handle(self) -> Any:
        """The loaded llama_model, for a second context on the same weights (bindings/embedder.py); it
        stays valid until close(), which must come after that context is freed."""
        self._check_open()
        return self._model

    @property
    def context_handle(self) -> Any:
        """The llama_context the engine decodes in, for a drafter that reads its outputs (bindings/mtp.py: the
        hidden states an MTP head drafts from); valid until close(), which must come after the drafter's."""
        self._check_open()
        return self._ctx

    @property
    def config(self) -> LlamaBackendConfig:
        return self._config

    def apply(self, ops: Sequence[CacheOp]) -> None:
        self._check_open()
        for op in ops:
            self._check_slot(op.slot, f"cache op {op.kind!r}")
            if op.kind == "clear":
                llama.llama_memory_seq_rm(self._memory, op.slot, -1, -1)
            elif op.kind == "truncate":
                self._truncate(op.slot, op.n_keep)
            elif op.kind == "save":
                self._save(op.slot, self._saved_states, op.slot)
            elif op.kind == "restore":
                self._restore(op.slot, self._saved_states, op.slot)
            elif op.kind == "stash":
                self._save(op.slot, self._prompt_cache, op.entry)
            elif op.kind == "load":
                self._restore(op.slot, self._prompt_cache, op.entry)
            elif op.kind == "drop":
                self._prompt_cache.pop(op.entry, None)
            elif op.kind == "checkpoint":
                self._checkpoint(op.slot)
            elif op.kind == "rollback":
                self._rollback(op.slot, op.n_keep)
            elif op.kind == "copy":
                self._check_slot(op.src, "copy source")
                if op.src == op.slot:
                    continue  # clearing the destination first would erase the source
                llama.llama_memory_seq_rm(self._memory, op.slot, -1, -1)
                llama.llama_memory_seq_cp(self._memory, op.src, op.slot, -1, -1)
            else:
                raise BackendError(f"unknown cache op {op.kind!r}; known: {', '.join(sorted(CACHE_OP_KINDS))}")

    def state_size(self, slot: int) -> int:
        self._check_open()
        self._check_slot(slot, "state_size")
        return int(llama.llama_state_seq_get_size(self._ctx, slot))

    def _truncate(self, slot: int, n_keep: int) -> None:
        if n_keep < 0:
            raise BackendError(f"truncate of slot {slot}: n_keep must be >= 0, got {n_keep}")
        if not llama.llama_memory_seq_rm(self._memory, slot, n_keep, -1):
            raise BackendError(
                f"slot {slot}: llama.cpp cannot keep only positions [0, {n_keep}) "
                f"(partial removal is not supported by this {self._info.architecture} model)"
            )

    def _save(self, slot: int, store: dict[int, tuple[bytearray, int]], key: int) -> None:
        """Copy a slot's whole sequence state (KV and recurrent state) into `store[key]`."""
        n_bytes = llama.llama_state_seq_get_size(self._ctx, slot)
        storage, _ = store.get(key, (bytearray(), 0))
        if len(storage) < n_bytes:
            storage = bytearray(n_bytes)  # grows only: a slot's snapshot is saved again and again
        view = (ctypes.c_uint8 * n_bytes).from_buffer(storage)
        n_written = llama.llama_state_seq_get_data(self._ctx, view, n_bytes, slot)
        if n_written != n_bytes:
            store.pop(key, None)  # the old state may be half overwritten
            raise BackendError(f"saving slot {slot}: llama.cpp wrote {n_written} of {n_bytes} bytes")
        store[key] = (storage, n_bytes)

    def _checkpoint(self, slot: int) -> None:
        """Speculation on a model without partial removal: keep the slot's recurrent state before a decode of
        drafted tokens (LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY: the hybrid memory writes only its recurrent part,
        a fixed size; the attention KV can be cut back by position). As llama-server's speculative checkpoints."""
        if self._info.supports_partial_removal:
            return  # a rollback is a plain truncate there
        flags = llama.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
        n_bytes = llama.llama_state_seq_get_size_ext(self._ctx, slot, flags)
        storage, _ = self._checkpoints.get(slot, (bytearray(), 0))
        if len(storage) < n_bytes:
            storage = bytearray(n_bytes)
        view = (ctypes.c_uint8 * n_bytes).from_buffer(storage)
        n_written = llama.llama_state_seq_get_data_ext(self._ctx, view, n_bytes, slot, flags)
        if n_written != n_bytes:
            self._checkpoints.pop(slot, None)
            raise BackendError(f"checkpoint of slot {slot}: llama.cpp wrote {n_written} of {n_bytes} bytes")
        self._checkpoints[slot] = (storage, n_bytes)

    def _rollback(self, slot: int, n_keep: int) -> None:
        """Back to the checkpoint's recurrent state, and the attention KV cut to its n_keep positions: then
        seq_rm(n_keep, -1) works on a hybrid model, since the restored recurrent cell ends at n_keep - 1."""
        if self._info.supports_partial_removal:
            self._truncate(slot, n_keep)
            return
        if slot not in self._checkpoints:
            raise BackendError(f"rollback of slot {slot}: no checkpoint was taken")
        storage, n_bytes = self._checkpoints[slot]
        view = (ctypes.c_uint8 * n_bytes).from_buffer(storage)
        flags = llama.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
        if llama.llama_state_seq_set_data_ext(self._ctx, view, n_bytes, slot, flags) != n_bytes:
            raise BackendError(f"rollback of slot {slot}: llama.cpp could not restore its checkpoint")
        if not llama.llama_memory_seq_rm(self._memory, slot, n_keep, -1):
            raise BackendError(f"rollback of slot {slot}: llama.cpp cannot drop its positions from {n_keep} on")

    def _restore(self, slot: int, store: dict[int, tuple[bytearray, int]], key: int) -> None:
        if key not in store:
            raise BackendError(f"restore into slot {slot}: nothing was saved under {key}")
        storage, n_bytes = store[key]
        self._route_log_here()
        self._log_capture.drain()
        llama.llama_memory_seq_rm(self._memory, slot, -1, -1)
        view = (ctypes.c_uint8 * n_bytes).from_buffer(storage)
        n_read = llama.llama_state_seq_set_data(self._ctx, view, n_bytes, slot)
        if n_read == 0:
            detail = failure_detail(self._log_capture.drain())
            raise BackendError(f"restoring slot {slot} failed: {detail}")

    def decode(self, entries: Sequence[BatchEntry]) -> None:
        self._check_open()
        self._output_indices = frozenset()
        self._prompt_logprobs = {}
        n_tokens = self._fill_batch(entries)
        self._route_log_here()
        self._log_capture.drain()
        status = llama.llama_decode(self._ctx, self._batch)
        if status != 0:
            meaning = _DECODE_ERRORS.get(status, "fatal error during the computation")
            detail = failure_detail(self._log_capture.drain())
            raise DecodeError(f"llama_decode failed with {status} ({meaning}) on {n_tokens} tokens: {detail}")
        self._output_indices = self._pending_output_indices
        self._compute_prompt_logprobs()

    def _compute_prompt_logprobs(self) -> None:
        """Each wanted position's next-token logprob (and top-N), from its row of the decode's logits."""
        for slot, first_index, targets, n_top in self._pending_prompt_targets:
            self._prompt_logprobs[slot] = tuple(
                self._logprob(target, first_index + offset, n_top) for offset, target in enumerate(targets)
            )

    def prompt_logprobs(self, slot: int) -> tuple[TokenLogprob, ...]:
        self._check_open()
        return self._prompt_logprobs.get(slot, ())

    def _fill_batch(self, entries: Sequence[BatchEntry]) -> int:
        """Write the entries into the preallocated batch in order; return the number of tokens."""
        n_tokens = sum(len(entry.tokens) for entry in entries)
        if n_tokens == 0:
            raise DecodeError("a decode needs at least one token")
        if n_tokens > self._info.n_batch:
            raise DecodeError(f"{n_tokens} tokens in one decode exceed n_batch={self._info.n_batch}")
        outputs: list[int] = []
        self._pending_prompt_targets = []
        start = 0
        try:
            for entry in entries:
                if not 0 <= entry.slot < self._info.n_slots:
                    raise DecodeError(f"slot {entry.slot} is outside 0..{self._info.n_slots - 1}")
                if entry.start_pos < 0:
                    raise DecodeError(f"slot {entry.slot}: negative start position {entry.start_pos}")
                end = start + len(entry.tokens)
                self._batch_tokens[start:end] = entry.tokens
                self._batch_positions[start:end] = np.arange(entry.start_pos, entry.start_pos + len(entry.tokens))
                self._batch_output_flags[start:end] = 0
                for seq_ids in self._batch_seq_ids[start:end]:
                    seq_ids[0] = entry.slot
                if entry.logits_last and end > start:
                    first = end - min(max(entry.n_logits, 1), end - start)  # n_logits > 1: drafted positions
                    self._batch_output_flags[first:end] = 1
                    outputs += range(first, end)
                if entry.logprob_targets:
                    outputs += self._want_prompt_logits(entry, start)
                start = end
        except OverflowError as exc:
            raise DecodeError(f"a token id or position does not fit llama.cpp's int32: {exc}") from exc
        assert self._batch is not None
        self._batch.n_tokens = n_tokens
        self._pending_output_indices = frozenset(outputs)
        return n_tokens

    def _want_prompt_logits(self, entry: BatchEntry, start: int) -> list[int]:
        """Ask llama.cpp for logits on the entry's positions whose next token's logprob is wanted."""
        n_targets = len(entry.logprob_targets)
        if n_targets > len(entry.tokens):
            raise DecodeError(f"slot {entry.slot}: {n_targets} logprob targets for {len(entry.tokens)} tokens")
        self._batch_output_flags[start : start + n_targets] = 1
        self._pending_prompt_targets.append((entry.slot, start, entry.logprob_targets, entry.top_logprobs))
        return list(range(start, start + n_targets))

    def new_sampler(self, sampler_id: int, params: SamplingParams) -> None:
        self._check_open()
        self.free_sampler(sampler_id)
        grammar = self._new_grammar(params)  # first: it is the part that can fail
        if grammar is not None:
            self._grammars[sampler_id] = grammar
            shortlist_biases = self._top_k_shortlist_biases(params)
            if shortlist_biases is not None:
                self._shortlists[sampler_id] = (shortlist_biases, params.top_k)
        self._samplers[sampler_id] = self._build_sampler_chain(params)
        greedy_biases = self._argmax_biases(params)
        if greedy_biases is not None:
            self._greedy_biases[sampler_id] = greedy_biases

    def _argmax_biases(self, params: SamplingParams) -> _GreedyBiases | None:
        """For a chain that is only non-positive logit biases + greedy (stateless: nothing to accept), the biases
        an argmax must respect; None when the chain has to run (penalties, or a bias that can raise a token)."""
        if not params.greedy or params.repeat_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
            return None
        biases = dict(params.logit_bias)
        if params.ignore_eos:
            biases.update(dict.fromkeys(self._eog_tokens, -math.inf))
        if any(bias > 0 for bias in biases.values()):
            return None
        return _GreedyBiases(
            tokens=frozenset(biases),
            token_array=np.fromiter(biases, dtype=np.intp, count=len(biases)),
            bias_array=np.fromiter(biases.values(), dtype=np.float32, count=len(biases)),
        )

    def _build_sampler_chain(self, params: SamplingParams) -> Any:
        biases = dict(params.logit_bias)
        for token in biases:
            self._check_token(token, "logit_bias")
        if params.ignore_eos:
            biases.update(dict.fromkeys(self._eog_tokens, -math.inf))
        chain_params = llama.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        chain = llama.llama_sampler_chain_init(chain_params)
        stages = []
        if biases:
            entries = (llama.llama_logit_bias * len(biases))(
                *(llama.llama_logit_bias(token, bias) for token, bias in biases.items())
            )
            stages.append(llama.llama_sampler_init_logit_bias(self._n_vocab, len(biases), entries))
        if params.repeat_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
            stages.append(
                llama.llama_sampler_init_penalties(
                    self._n_vocab,
                    params.penalty_last_n,
                    params.repeat_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                )
            )
        if params.greedy:
            stages.append(llama.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                stages.append(llama.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                stages.append(llama.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0.0:
                stages.append(llama.llama_sampler_init_min_p(params.min_p, 1))
            stages.append(llama.llama_sampler_init_temp(params.temperature))
            seed = llama.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
            stages.append(llama.llama_sampler_init_dist(seed))
        for stage in stages:
            llama.llama_sampler_chain_add(chain, stage)  # the chain owns and frees its stages
        return chain

    def _new_grammar(self, params: SamplingParams) -> GrammarGate | None:
        """The request's grammar sampler; it acts first, before biases, penalties and top-k/p (see sample)."""
        if params.grammar is None:
            return None
        self._route_log_here()
        self._log_capture.drain()
        if params.grammar_triggers:  # lazy (tool_choice auto): enforced only from a trigger's match on
            patterns = (ctypes.c_char_p * len(params.grammar_triggers))(
                *(trigger.encode() for trigger in params.grammar_triggers)
            )
            grammar = llama.llama_sampler_init_grammar_lazy_patterns(
                self._vocab, params.grammar.encode(), b"root", patterns, len(patterns), None, 0
            )
        else:
            grammar = llama.llama_sampler_init_grammar(self._vocab, params.grammar.encode(), b"root")
        if not grammar:
            raise BackendError(f"the grammar could not be compiled: {failure_detail(self._log_capture.drain())}")
        return GrammarGate(grammar)

    def set_threads(self, n_threads: int) -> None:
        """llama_set_n_threads: generation and batch threads alike (a shared core's count is one number)."""
        self._check_open()
        llama.llama_set_n_threads(self._ctx, n_threads, n_threads)

    def free_sampler(self, sampler_id: int) -> None:
        self._greedy_biases.pop(sampler_id, None)
        self._shortlists.pop(sampler_id, None)
        grammar = self._grammars.pop(sampler_id, None)
        if grammar is not None:
            grammar.free()
        chain = self._samplers.pop(sampler_id, None)
        if chain is not None:
            llama.llama_sampler_free(chain)

    def sample(self, sampler_id: int, logits_index: int, params: SamplingParams) -> SampledToken:
        self._check_open()
        chain = self._samplers.get(sampler_id)
        if chain is None:
            raise BackendError(f"no sampler with id {sampler_id}")
        if logits_index not in self._output_indices:
            raise BackendError(f"the last decode produced no logits at batch index {logits_index}")
        greedy_biases = self._greedy_biases.get(sampler_id)
        grammar = self._grammars.get(sampler_id)
        if grammar is not None:
            token = self._constrained_token(chain, grammar, sampler_id, logits_index)
        elif greedy_biases is None:
            token = llama.llama_sampler_sample(chain, self._ctx, logits_index)
        else:
            token = self._greedy_token(logits_index, greedy_biases)
        if not params.logprobs:
            return SampledToken(token=token)
        return SampledToken(token=token, logprob=self._logprob(token, logits_index, params.top_logprobs))

    def _constrained_token(self, chain: Any, grammar: GrammarGate, sampler_id: int, logits_index: int) -> int:
        if self._candidates is None:
            self._candidates = Candidates(self._n_vocab)
        logits = self._logits_view(logits_index)
        return sample_constrained(chain, grammar, self._candidates, logits, self._constrained_plan(logits, sampler_id))

    def _constrained_plan(self, logits: npt.NDArray[np.float32], sampler_id: int) -> ConstrainedPlan:
        """Which shortcuts are exact for this sampler's chain (see bindings/constrained.py and new_sampler)."""
        greedy_biases = self._greedy_biases.get(sampler_id)
        if greedy_biases is not None:  # biases (none positive) + argmax
            return ConstrainedPlan(stateless_argmax=True, shortlist_scores=_biased(logits, greedy_biases))
        shortlist = self._shortlists.get(sampler_id)
        if shortlist is not None:
            biases, top_k = shortlist
            return ConstrainedPlan(stateless_argmax=False, shortlist_scores=_biased(logits, biases), min_allowed=top_k)
        return ConstrainedPlan(stateless_argmax=False, shortlist_scores=None)

    def _top_k_shortlist_biases(self, params: SamplingParams) -> _GreedyBiases | None:
        """For top-k sampling without penalties (nothing reorders tokens between the biases and top-k), the
        biases a grammar shortlist is ranked by; None where only the full grammar pass is exact."""
        no_penalties = params.repeat_penalty == 1.0 and not params.frequency_penalty and not params.presence_penalty
        if params.greedy or not 0 < params.top_k <= SHORTLIST // 4 or not no_penalties:
            return None
        return self._argmax_biases(replace(params, temperature=0.0))

    def _greedy_token(self, logits_index: int, biases: _GreedyBiases) -> int:
        """What the logit-bias + greedy chain picks, without it: llama_sampler_sample copies all n_vocab logits
        into a candidate array per call (~75 µs for SmolLM2's 49k tokens, ~1.2 ms per 16-slot step); an
        argmax over the logits in place takes ~10 µs. Biases only lower logits, so the unbiased argmax stands
        unless it is a biased token. Both take the first of equal maxima and add the bias in float32."""
        logits = self._logits_view(logits_index)
        best = int(logits.argmax())
        if best in biases.tokens:
            biased = logits.copy()
            biased[biases.token_array] += biases.bias_array
            best = int(biased.argmax())
        return best

    def _logits_view(self, logits_index: int) -> npt.NDArray[np.float32]:
        """The row in place. np.frombuffer over a ctypes array type made once: np.ctypeslib.as_array builds
        the type per call in Python (~30 µs right after a decode has evicted the caches)."""
        address = _logits_row_address(self._ctx, logits_index)
        if not address:
            raise BackendError(f"llama.cpp has no logits at batch index {logits_index}")
        return np.frombuffer(self._logits_row_type.from_address(address), dtype=np.float32)

    def _logprob(self, token: int, logits_index: int, n_top: int) -> TokenLogprob:
        """log-softmax of the model's raw logits (before bias, penalties and temperature)."""
        logits = self._logits_view(logits_index)
        max_logit = float(logits.max())
        log_normalizer = max_logit + math.log(float(np.exp(logits - max_logit).sum(dtype=np.float64)))
        top: tuple[TopLogprob, ...] = ()
        if n_top > 0:
            n_top = min(n_top, self._n_vocab)
            best = np.argpartition(logits, -n_top)[-n_top:]
            best = best[np.argsort(-logits[best], kind="stable")]
            top = tuple(
                TopLogprob(token=int(t), text=self._pieces[t], logprob=float(logits[t]) - log_normalizer) for t in best
            )
        return TokenLogprob(
            token=token, text=self._pieces[token], logprob=float(logits[token]) - log_normalizer, top=top
        )

    def logits(self, logits_index: int) -> npt.NDArray[np.float32]:
        """A copy of the raw logits at a batch index of the last decode (tests and the probe compare them)."""
        self._check_open()
        if logits_index not in self._output_indices:
            raise BackendError(f"the last decode produced no logits at batch index {logits_index}")
        return self._logits_view(logits_index).copy()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sampler_id in list(self._samplers):
            self.free_sampler(sampler_id)
        if self._batch is not None:
            llama.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama.llama_model_free(self._model)
            self._model = None
        self._saved_states.clear()
        self._prompt_cache.clear()
        self._checkpoints.clear()
        self._release_log_capture()

    def _route_log_here(self) -> None:
        """Send llama.cpp's (process-wide) log to this backend's capture.

        Called before the calls whose failures quote the log, since another backend loaded later in the
        same process takes the log over. One pointer swap; the engine thread is the only caller.
        """
        route_llama_log(self._log_user_data)

    def _release_log_capture(self) -> None:
        """Point llama.cpp's log back at the capture-less route if it still points at this backend."""
        user_data = getattr(self, "_log_user_data", None)
        if user_data is None:
            return
        current_callback = llama.llama_log_callback()
        current_user_data = ctypes.c_void_p()
        llama.llama_log_get(ctypes.byref(current_callback), ctypes.byref(current_user_data))
        if current_user_data.value == user_data.value:
            llama.llama_log_set(LLAMA_LOG_CALLBACK, ctypes.c_void_p(None))

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()

    # --- Vocab ---------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        self._check_open()
        data = text.encode("utf-8")
        capacity = len(data) + 2
        tokens = (llama.llama_token * capacity)()
        n_tokens = llama.llama_tokenize(self._vocab, data, len(data), tokens, capacity, add_special, parse_special)
        if n_tokens < 0:
            capacity = -n_tokens
            tokens = (llama.llama_token * capacity)()
            n_tokens = llama.llama_tokenize(self._vocab, data, len(data), tokens, capacity, add_special, parse_special)
        if n_tokens < 0:
            raise BackendError(f"tokenizing {len(data)} bytes failed ({n_tokens})")
        return list(tokens[:n_tokens])

    def piece(self, token: int) -> bytes:
        self._check_token(token, "piece")
        return self._pieces[token]

    def is_eog(self, token: int) -> bool:
        return token in self._eog_tokens

    def token_text(self, token: int) -> str:
        self._check_open()
        self._check_token(token, "token_text")
        text = llama.llama_vocab_get_text(self._vocab, token)
        return text.decode("utf-8", errors="replace") if text else ""

    # --- checks --------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError("the backend is closed")

    def _check_slot(self, slot: int, what: str) -> None:
        if not 0 <= slot < self._info.n_slots:
            raise BackendError(f"{what}: slot {slot} is outside 0..{self._info.n_slots - 1}")

    def _check_token(self, token: int, what: str) -> None:
        if not 0 <= token < self._n_vocab:
            raise BackendError(f"{what}: token id {token} is outside the vocabulary (0..{self._n_vocab - 1})")
