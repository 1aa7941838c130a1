"""llama.cpp's quantizer (llama_model_quantize) with per-tensor type overrides; convert/quantize.py decides
the recipe, this module only makes the call."""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import gguf
import llama_cpp.llama_cpp as llama

from bindings.llama_log import LLAMA_LOG_CALLBACK, LogCapture, failure_detail
from bindings.protocol import BackendError

logger = logging.getLogger(__name__)


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

    capture = LogCapture(logger)
    capture_ref = ctypes.py_object(capture)
    user_data = ctypes.cast(ctypes.pointer(capture_ref), ctypes.c_void_p)
    llama.llama_backend_init()
    llama.llama_log_set(LLAMA_LOG_CALLBACK, user_data)
    try:
        status = llama.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params))
    finally:
        llama.llama_log_set(LLAMA_LOG_CALLBACK, ctypes.c_void_p(None))
    if status != 0:
        raise BackendError(f"llama_model_quantize({src} -> {dst}) failed: {failure_detail(capture.drain())}")
