"""llama.cpp behind the engine's Backend protocol. The ONLY module that imports the llama.cpp bindings.

One model, one context with `n_seq_max` = number of slots, one preallocated `llama_batch` refilled every
step, one `llama_sampler` chain per sampler id. It also reads back what llama.cpp says it allocated
(`memory_report()`), places tensors on devices by regex (`tensor_overrides`, like llama.cpp's `-ot`), and
holds the child side of the extra-buffer-type probe (`python -m server.engine.llama_backend
--probe-extra-bufts`, see bufts_probe.py).

Every method is meant for the engine thread, except the Vocab ones (tokenize, piece, is_eog, token_text),
which only read the vocabulary and may be called from any thread while the backend is open.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import logging
import math
import os
import re
import resource
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import gguf
import llama_cpp.llama_cpp as llama
import numpy as np
import numpy.typing as npt

from server.engine.backend import (
    BackendError,
    BatchEntry,
    CacheOp,
    DecodeError,
    ModelInfo,
    SampledToken,
)
from server.engine.request import TokenLogprob, TopLogprob
from server.engine.sampling import SamplingParams

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
CACHE_OP_KINDS: frozenset[str] = frozenset({"clear", "truncate", "save", "restore", "copy", "stash", "load", "drop"})

# llama_decode's return codes (llama.h).
_DECODE_ERRORS: Mapping[int, str] = MappingProxyType(
    {
        1: "no room in the KV cache for this batch (the context is full)",
        2: "the decode was aborted",
        -1: "invalid input batch",
    }
)

# ggml_log_level (ggml.h); CONT continues the line of the previous call.
_LOG_DEBUG, _LOG_INFO, _LOG_WARN, _LOG_ERROR, _LOG_CONT = 1, 2, 3, 4, 5
_LOG_TO_LOGGING: Mapping[int, int] = MappingProxyType(
    {_LOG_DEBUG: logging.DEBUG, _LOG_INFO: logging.DEBUG, _LOG_WARN: logging.WARNING, _LOG_ERROR: logging.ERROR}
)
# Lines kept between two drains; bounds memory if llama.cpp logs a lot between them.
_MAX_CAPTURED_LINES = 4096
_GGML_BACKEND_DEVICE_TYPE_CPU = 0


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


@dataclass(frozen=True)
class MemoryReport:
    """Bytes llama.cpp said it allocated while loading, read from its log (printed in MiB, 2 decimals).

    model_bytes: weights per buffer name ("CPU_Mapped", "CPU_REPACK", "CUDA0", "CUDA_Host", ...).
    kv_cache_bytes / recurrent_state_bytes / compute_bytes / output_bytes: per buffer or device name.
    """

    model_bytes: Mapping[str, int]
    kv_cache_bytes: Mapping[str, int]
    recurrent_state_bytes: Mapping[str, int]
    compute_bytes: Mapping[str, int]
    output_bytes: Mapping[str, int]

    @property
    def total_bytes(self) -> int:
        parts = (self.model_bytes, self.kv_cache_bytes, self.recurrent_state_bytes, self.compute_bytes)
        return sum(sum(part.values()) for part in (*parts, self.output_bytes))


_MEMORY_LINE = re.compile(
    r"^\S+:\s+(?P<name>\S+)\s+(?P<kind>model|KV|RS|compute|output) buffer size\s*=\s*(?P<mib>[\d.]+) MiB"
)
_COMPUTE_RESERVE_LINE = re.compile(r"^sched_reserve: reserving \.\.\.")


def parse_memory_report(log_lines: Sequence[str]) -> MemoryReport:
    """Turn llama.cpp's load-time log lines into a MemoryReport.

    Several buffers of one kind and name add up (e.g. the KV caches of an iSWA model, mmap'd shards).
    The compute buffers are reserved again whenever the graph changes; the last reservation counts.
    """
    sums: dict[str, dict[str, int]] = {kind: {} for kind in ("model", "KV", "RS", "output")}
    compute: dict[str, int] = {}
    for line in log_lines:
        if _COMPUTE_RESERVE_LINE.match(line):
            compute = {}
            continue
        match = _MEMORY_LINE.match(line)
        if match is None:
            continue
        n_bytes = round(float(match["mib"]) * 1024 * 1024)
        if match["kind"] == "compute":
            compute[match["name"]] = n_bytes
        else:
            per_name = sums[match["kind"]]
            per_name[match["name"]] = per_name.get(match["name"], 0) + n_bytes
    return MemoryReport(
        model_bytes=MappingProxyType(sums["model"]),
        kv_cache_bytes=MappingProxyType(sums["KV"]),
        recurrent_state_bytes=MappingProxyType(sums["RS"]),
        compute_bytes=MappingProxyType(compute),
        output_bytes=MappingProxyType(sums["output"]),
    )


class _LogCapture:
    """One backend's share of llama.cpp's log: whole lines at INFO and above, forwarded to `logging`."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._lines: collections.deque[str] = collections.deque(maxlen=_MAX_CAPTURED_LINES)
        self._partial = ""
        self._partial_level = _LOG_INFO

    def feed(self, level: int, text: str) -> None:
        if level != _LOG_CONT:
            if self._partial:
                self._emit(self._partial_level, self._partial)
                self._partial = ""
            self._partial_level = level
        *complete, self._partial = (self._partial + text).split("\n")
        for line in complete:
            self._emit(self._partial_level, line)

    def drain(self) -> list[str]:
        """The lines captured since the last drain (and forget them)."""
        lines = list(self._lines)
        self._lines.clear()
        return lines

    def _emit(self, level: int, line: str) -> None:
        if not line.strip():
            return
        logging_level = _LOG_TO_LOGGING.get(level, logging.DEBUG)
        if self._log.isEnabledFor(logging_level):
            self._log.log(logging_level, "llama.cpp: %s", line)
        if level >= _LOG_INFO:
            self._lines.append(line)


def _route_llama_log(level: int, text: bytes | None, user_data: int | None) -> None:
    """llama.cpp's log callback: user_data points at the owning backend's py_object(_LogCapture)."""
    message = text.decode("utf-8", errors="replace") if text else ""
    try:
        if user_data:
            capture = ctypes.cast(user_data, ctypes.POINTER(ctypes.py_object)).contents.value
            capture.feed(level, message)
        elif level >= _LOG_INFO and message.strip():
            logger.debug("llama.cpp: %s", message.rstrip("\n"))
    except Exception:  # an exception must never unwind into C
        logger.exception("llama.cpp log callback failed")


# A constant: llama.cpp keeps this pointer, so the function object lives as long as the module.
_LLAMA_LOG_CALLBACK = llama.llama_log_callback(_route_llama_log)


def _bindings_lib_dir() -> Path:
    """Where the bindings load libllama/libggml from (their LLAMA_CPP_LIB_PATH override included)."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    return Path(override) if override else Path(llama.__file__).resolve().parent / "lib"


def _load_shared_library(lib_dir: Path, base_name: str) -> ctypes.CDLL:
    for suffix in (".so", ".dylib"):
        candidate = lib_dir / f"lib{base_name}{suffix}"
        if candidate.exists():
            return ctypes.CDLL(str(candidate))
    raise BackendError(f"lib{base_name} is missing from {lib_dir}")


def _c_function(library: ctypes.CDLL, name: str, argtypes: list[Any], restype: Any) -> Any:
    """A C function of `library` with its signature declared (ctypes would guess int otherwise)."""
    function = getattr(library, name)
    function.argtypes = argtypes
    function.restype = restype
    return function


class _GgmlDevices:
    """ggml's device registry, which the llama bindings do not wrap (needed for tensor_buft_overrides)."""

    def __init__(self) -> None:
        lib_dir = _bindings_lib_dir()
        ggml = _load_shared_library(lib_dir, "ggml")
        ggml_base = _load_shared_library(lib_dir, "ggml-base")
        self._dev_count = _c_function(ggml, "ggml_backend_dev_count", [], ctypes.c_size_t)
        self._dev_get = _c_function(ggml, "ggml_backend_dev_get", [ctypes.c_size_t], ctypes.c_void_p)
        self._dev_by_name = _c_function(ggml, "ggml_backend_dev_by_name", [ctypes.c_char_p], ctypes.c_void_p)
        self._dev_by_type = _c_function(ggml, "ggml_backend_dev_by_type", [ctypes.c_int], ctypes.c_void_p)
        self._dev_name = _c_function(ggml_base, "ggml_backend_dev_name", [ctypes.c_void_p], ctypes.c_char_p)
        self._dev_buffer_type = _c_function(
            ggml_base, "ggml_backend_dev_buffer_type", [ctypes.c_void_p], ctypes.c_void_p
        )

    def names(self) -> tuple[str, ...]:
        names = []
        for index in range(self._dev_count()):
            raw_name = self._dev_name(self._dev_get(index))
            names.append(raw_name.decode() if raw_name else f"device{index}")
        return tuple(names)

    def buffer_type(self, device_name: str) -> int:
        """The default buffer type of a device by name (case-insensitive); BackendError if unknown."""
        device = self._dev_by_name(device_name.encode())
        if not device:
            matches = [name for name in self.names() if name.lower() == device_name.lower()]
            if matches:
                device = self._dev_by_name(matches[0].encode())
            elif device_name.lower() == "cpu":
                device = self._dev_by_type(_GGML_BACKEND_DEVICE_TYPE_CPU)
        if not device:
            available = ", ".join(self.names()) or "none"
            raise BackendError(f"unknown device {device_name!r} in a tensor override; available devices: {available}")
        buffer_type = self._dev_buffer_type(device)
        if not buffer_type:
            raise BackendError(f"device {device_name!r} has no buffer type")
        return int(buffer_type)


class _BufferTypeOverride(ctypes.Structure):
    """struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; }"""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def _buffer_type_overrides(
    overrides: Sequence[tuple[str, str]], devices: _GgmlDevices
) -> ctypes.Array[_BufferTypeOverride]:
    """The NULL-pattern-terminated C array for llama_model_params.tensor_buft_overrides."""
    array = (_BufferTypeOverride * (len(overrides) + 1))()
    for index, (pattern, device_name) in enumerate(overrides):
        array[index].pattern = pattern.encode()  # the array keeps the bytes alive (its _objects)
        array[index].buft = devices.buffer_type(device_name)
    return array


def _default_thread_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _load_mode(use_mmap: bool, use_mlock: bool) -> int:
    if use_mmap:
        return llama.LLAMA_LOAD_MODE_MMAP_MLOCK if use_mlock else llama.LLAMA_LOAD_MODE_MMAP
    return llama.LLAMA_LOAD_MODE_MLOCK if use_mlock else llama.LLAMA_LOAD_MODE_NONE


def _failure_detail(log_lines: Sequence[str]) -> str:
    """The most telling lines of what llama.cpp logged while an operation failed."""
    telling = [line.strip() for line in log_lines if re.search(r"error|fail|invalid|unable|cannot", line, re.I)]
    chosen = telling[-3:] if telling else [line.strip() for line in log_lines[-2:]]
    return "; ".join(chosen) if chosen else "llama.cpp gave no reason"


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
        self._saved_states: dict[int, tuple[bytearray, int]] = {}  # per-slot snapshots ("save"/"restore")
        self._prompt_cache: dict[int, tuple[bytearray, int]] = {}  # stashed states by entry id ("stash"/"load")
        self._output_indices: frozenset[int] = frozenset()  # batch indices with logits, last decode
        self._pending_output_indices: frozenset[int] = frozenset()  # those of the batch being decoded
        self._config = config
        model_path = Path(model_path)
        if not model_path.is_file():
            raise BackendError(f"model file {model_path} does not exist")
        llama.llama_backend_init()  # idempotent: it only initialises ggml's timer and tables
        # Resolve devices before loading anything: an unknown device must fail fast and cleanly.
        self._buft_overrides = _buffer_type_overrides(config.tensor_overrides, _GgmlDevices())
        self._tensor_split = _tensor_split_array(config.tensor_split)  # kept alive for the model's lifetime
        self._log_capture = _LogCapture(logger)
        self._log_capture_ref = ctypes.py_object(self._log_capture)  # what user_data points at
        self._log_user_data = ctypes.cast(ctypes.pointer(self._log_capture_ref), ctypes.c_void_p)
        self._route_log_here()
        try:
            self._model = self._load_model(model_path)
            self._ctx = self._create_context(model_path)
            self._memory_report = parse_memory_report(self._log_capture.drain())
            self._vocab = llama.llama_model_get_vocab(self._model)
            self._n_vocab = llama.llama_vocab_n_tokens(self._vocab)
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
        model = llama.llama_model_load_from_file(os.fsencode(model_path), params)
        if not model:
            detail = _failure_detail(self._log_capture.drain())
            raise BackendError(f"cannot load model {model_path}: {detail}")
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
            detail = _failure_detail(self._log_capture.drain())
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
            elif op.kind == "copy":
                self._check_slot(op.src, "copy source")
                if op.src == op.slot:
                    continue  # clearing the destination first would erase the source
                llama.llama_memory_seq_rm(self._memory, op.slot, -1, -1)
                llama.llama_memory_seq_cp(self._memory, op.src, op.slot, -1, -1)
            else:
                raise BackendError(f"unknown cache op {op.kind!r}; known: {', '.join(sorted(CACHE_OP_KINDS))}")

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
            detail = _failure_detail(self._log_capture.drain())
            raise BackendError(f"restoring slot {slot} failed: {detail}")

    def decode(self, entries: Sequence[BatchEntry]) -> None:
        self._check_open()
        self._output_indices = frozenset()
        n_tokens = self._fill_batch(entries)
        self._route_log_here()
        self._log_capture.drain()
        status = llama.llama_decode(self._ctx, self._batch)
        if status != 0:
            meaning = _DECODE_ERRORS.get(status, "fatal error during the computation")
            detail = _failure_detail(self._log_capture.drain())
            raise DecodeError(f"llama_decode failed with {status} ({meaning}) on {n_tokens} tokens: {detail}")
        self._output_indices = self._pending_output_indices

    def _fill_batch(self, entries: Sequence[BatchEntry]) -> int:
        """Write the entries into the preallocated batch in order; return the number of tokens."""
        n_tokens = sum(len(entry.tokens) for entry in entries)
        if n_tokens == 0:
            raise DecodeError("a decode needs at least one token")
        if n_tokens > self._info.n_batch:
            raise DecodeError(f"{n_tokens} tokens in one decode exceed n_batch={self._info.n_batch}")
        outputs = []
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
                    self._batch_output_flags[end - 1] = 1
                    outputs.append(end - 1)
                start = end
        except OverflowError as exc:
            raise DecodeError(f"a token id or position does not fit llama.cpp's int32: {exc}") from exc
        assert self._batch is not None
        self._batch.n_tokens = n_tokens
        self._pending_output_indices = frozenset(outputs)
        return n_tokens

    def new_sampler(self, sampler_id: int, params: SamplingParams) -> None:
        self._check_open()
        self.free_sampler(sampler_id)
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

    def free_sampler(self, sampler_id: int) -> None:
        self._greedy_biases.pop(sampler_id, None)
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
        if greedy_biases is None:
            token = llama.llama_sampler_sample(chain, self._ctx, logits_index)
        else:
            token = self._greedy_token(logits_index, greedy_biases)
        if not params.logprobs:
            return SampledToken(token=token)
        return SampledToken(token=token, logprob=self._logprob(token, logits_index, params.top_logprobs))

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
        pointer = llama.llama_get_logits_ith(self._ctx, logits_index)
        if not pointer:
            raise BackendError(f"llama.cpp has no logits at batch index {logits_index}")
        return np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))

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
        self._release_log_capture()

    def _route_log_here(self) -> None:
        """Send llama.cpp's (process-wide) log to this backend's capture.

        Called before the calls whose failures quote the log, since another backend loaded later in the
        same process takes the log over. One pointer swap; the engine thread is the only caller.
        """
        llama.llama_log_set(_LLAMA_LOG_CALLBACK, self._log_user_data)

    def _release_log_capture(self) -> None:
        """Point llama.cpp's log back at the capture-less route if it still points at this backend."""
        user_data = getattr(self, "_log_user_data", None)
        if user_data is None:
            return
        current_callback = llama.llama_log_callback()
        current_user_data = ctypes.c_void_p()
        llama.llama_log_get(ctypes.byref(current_callback), ctypes.byref(current_user_data))
        if current_user_data.value == user_data.value:
            llama.llama_log_set(_LLAMA_LOG_CALLBACK, ctypes.c_void_p(None))

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


# --- extra-buffer-type probe (child side; bufts_probe.py runs this in a subprocess) -------------------------

PROBE_ARCH = "llama"
PROBE_DTYPES: tuple[str, ...] = ("q4_0", "q8_0", "f16")  # AMX has kernels for the quantized ones; f16 too
PROBE_PROMPTS: tuple[str, str] = (
    "The quick brown fox jumps over the lazy dog, and the dog does not mind at all.",
    "Once upon a time there was a king who had three daughters and a golden ball.",
)
PROBE_STEPS = 4  # single-token decode steps after the prompts


def quantize_file(src: Path, dst: Path, ftype: int, tensor_types: Sequence[tuple[str, str]], n_threads: int) -> None:
    """llama_model_quantize(src → dst) to llama_ftype `ftype`; raise BackendError with llama.cpp's reason.

    tensor_types: (regex, ggml type name such as "q8_0") pairs, first match wins, searched in each
    quantizable tensor's name, like llama-quantize's --tensor-type (llama.cpp still falls back to a
    compatible type when a row length is not a multiple of the type's block size). n_threads <= 0: all cores.
    """
    params = llama.llama_model_quantize_default_params()
    params.nthread = n_threads
    params.ftype = ftype
    # llama.cpp reads the patterns until a NULL one; the encoded strings must outlive the call.
    patterns = [pattern.encode() for pattern, _ in tensor_types]
    overrides = (llama.llama_model_tensor_override * (len(tensor_types) + 1))()
    for entry, pattern, (_, type_name) in zip(overrides, patterns, tensor_types, strict=False):
        entry.pattern = pattern
        entry.type = int(gguf.GGMLQuantizationType[type_name.upper()])
    overrides[len(tensor_types)].pattern = None
    if tensor_types:
        params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama.llama_model_tensor_override))

    capture = _LogCapture(logger)
    capture_ref = ctypes.py_object(capture)
    user_data = ctypes.cast(ctypes.pointer(capture_ref), ctypes.c_void_p)
    llama.llama_backend_init()
    llama.llama_log_set(_LLAMA_LOG_CALLBACK, user_data)
    try:
        status = llama.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params))
    finally:
        llama.llama_log_set(_LLAMA_LOG_CALLBACK, ctypes.c_void_p(None))
    if status != 0:
        raise BackendError(f"llama_model_quantize({src} -> {dst}) failed: {_failure_detail(capture.drain())}")


def probe_extra_bufts(work_dir: Path) -> dict[str, Any]:
    """Decode tiny models with extra buffer types on: two sequences in one batch vs each alone.

    Returns the JSON-able report bufts_probe.py judges: per dtype, the largest |logit difference|.
    A crash (the AMX bug) kills this process instead, which is why it runs in a child.
    """
    # convert.synth pulls in the gguf writer, which only the probe needs; import it here, not at startup.
    from convert.synth import write_synthetic_model

    started = time.monotonic()
    reports = []
    for dtype in PROBE_DTYPES:
        model_path = write_synthetic_model(PROBE_ARCH, work_dir / f"probe-{PROBE_ARCH}-{dtype}.gguf", dtype=dtype)
        reports.append({"dtype": dtype, **_probe_model(model_path)})
    return {
        "models": reports,
        "system_info": llama_system_info(),
        "seconds": round(time.monotonic() - started, 3),
    }


def _probe_model(model_path: Path) -> dict[str, Any]:
    config = LlamaBackendConfig(n_slots=2, n_ctx_per_slot=256, n_batch=128, n_ubatch=128, use_extra_bufts=True)
    backend = LlamaBackend(model_path, config, name=model_path.stem)
    try:
        prompts = [backend.tokenize(text, add_special=True, parse_special=False) for text in PROBE_PROMPTS]
        batched, continuations = _probe_decode(backend, prompts, slots=(0, 1), continuations=None)
        alone: list[list[npt.NDArray[np.float32]]] = []
        for slot in (0, 1):
            backend.apply([CacheOp("clear", slot=0), CacheOp("clear", slot=1)])
            logits, _ = _probe_decode(backend, [prompts[slot]], slots=(slot,), continuations=[continuations[slot]])
            alone.append(logits[0])
    finally:
        backend.close()
    differences = [
        float(np.max(np.abs(batched_step - alone_step)))
        for slot in (0, 1)
        for batched_step, alone_step in zip(batched[slot], alone[slot], strict=True)
    ]
    all_logits = [step for per_slot in batched + alone for step in per_slot]
    return {
        "max_abs_diff": max(differences),
        "max_abs_logit": max(float(np.max(np.abs(step))) for step in all_logits),
        "finite": all(bool(np.isfinite(step).all()) for step in all_logits),
        "n_compared": len(differences),
    }


def _probe_decode(
    backend: LlamaBackend,
    prompts: Sequence[Sequence[int]],
    *,
    slots: Sequence[int],
    continuations: Sequence[Sequence[int]] | None,
) -> tuple[list[list[npt.NDArray[np.float32]]], list[list[int]]]:
    """Prefill each prompt in its slot (one batch), then PROBE_STEPS one-token steps (one batch each).

    The tokens fed in the steps are the argmax of the previous logits, or `continuations` when given,
    so that a single-sequence rerun feeds exactly what the batched run fed.
    """
    logits: list[list[npt.NDArray[np.float32]]] = [[] for _ in slots]
    fed: list[list[int]] = [[] for _ in slots]
    entries = [BatchEntry(slot, tuple(prompt), 0, True) for slot, prompt in zip(slots, prompts, strict=True)]
    for step in range(PROBE_STEPS + 1):
        backend.decode(entries)
        index = -1
        next_entries = []
        for position, entry in enumerate(entries):
            index += len(entry.tokens)
            logits[position].append(backend.logits(index))
            if step == PROBE_STEPS:
                continue
            token = continuations[position][step] if continuations else int(np.argmax(logits[position][-1]))
            fed[position].append(token)
            next_entries.append(BatchEntry(entry.slot, (token,), entry.start_pos + len(entry.tokens), True))
        entries = next_entries
    return logits, fed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.engine.llama_backend")
    parser.add_argument(
        "--probe-extra-bufts",
        action="store_true",
        help="decode tiny models with extra buffer types on and print a JSON report (run as a child)",
    )
    args = parser.parse_args(argv)
    if not args.probe_extra_bufts:
        print("nothing to do: pass --probe-extra-bufts", file=sys.stderr)
        return 2
    # A crash is an expected outcome of the probe; leave no core file behind.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with tempfile.TemporaryDirectory(prefix="qwen3-local-probe-") as work_dir:
        try:
            report = probe_extra_bufts(Path(work_dir))
        except BackendError as exc:
            print(f"probe failed: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
