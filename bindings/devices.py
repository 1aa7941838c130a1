"""ggml's device registry (CPU, CUDA0, RPC..., which the llama bindings do not wrap), through ctypes.

Used to resolve tensor buffer-type overrides by device name, and to tell the planner which devices this
llama.cpp build sees, in llama.cpp's order, with their free memory (`list_devices`).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp.llama_cpp as llama

from bindings.protocol import BackendError

_GGML_BACKEND_DEVICE_TYPE_CPU = 0
# enum ggml_backend_dev_type (ggml-backend.h), in order.
DEVICE_KINDS: tuple[str, ...] = ("cpu", "gpu", "igpu", "accel", "meta")


@dataclass(frozen=True)
class DeviceInfo:
    """One ggml device as this llama.cpp build sees it."""

    index: int  # position in ggml's registry: the order llama.cpp assigns layers and tensor_split shares in
    name: str  # "CPU", "CUDA0", "RPC[host:port]", ...
    description: str  # e.g. "NVIDIA GeForce RTX 4080"
    kind: str  # one of DEVICE_KINDS
    free_bytes: int
    total_bytes: int
    device_id: str | None  # lower-case PCI bus id where the backend knows it ("0000:01:00.0")


class _DeviceCaps(ctypes.Structure):
    _fields_ = [
        ("async_", ctypes.c_bool),
        ("host_buffer", ctypes.c_bool),
        ("buffer_from_host_ptr", ctypes.c_bool),
        ("events", ctypes.c_bool),
    ]


class _DeviceProps(ctypes.Structure):
    """struct ggml_backend_dev_props (ggml-backend.h)."""

    _fields_ = [
        ("name", ctypes.c_char_p),
        ("description", ctypes.c_char_p),
        ("memory_free", ctypes.c_size_t),
        ("memory_total", ctypes.c_size_t),
        ("type", ctypes.c_int),
        ("device_id", ctypes.c_char_p),
        ("caps", _DeviceCaps),
    ]


def _bindings_lib_dir() -> Path:
    """Where the bindings load libllama/libggml from (their LLAMA_CPP_LIB_PATH override included)."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    return Path(override) if override else Path(llama.__file__).resolve().parent / "lib"


def _load_shared_library(lib_dir: Path, base_name: str) -> ctypes.CDLL:
    # The soname first (libggml.so.0): it is the file libllama links against. A wheel holds libggml.so and
    # libggml.so.0 as two copies, not links; loading the other copy would give a second, separate ggml
    # registry (devices registered there, e.g. RPC workers, are not the ones llama.cpp sees).
    for suffix in (".so.0", ".so", ".dylib"):
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


class GgmlDevices:
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
        self._dev_get_props = _c_function(
            ggml_base, "ggml_backend_dev_get_props", [ctypes.c_void_p, ctypes.POINTER(_DeviceProps)], None
        )

    def describe(self) -> tuple[DeviceInfo, ...]:
        """Every registered device, in registry order, with its memory as the backend reports it now."""
        devices = []
        for index in range(self._dev_count()):
            props = _DeviceProps()
            self._dev_get_props(self._dev_get(index), ctypes.byref(props))
            kind = DEVICE_KINDS[props.type] if 0 <= props.type < len(DEVICE_KINDS) else f"type{props.type}"
            devices.append(
                DeviceInfo(
                    index=index,
                    name=props.name.decode(errors="replace") if props.name else f"device{index}",
                    description=props.description.decode(errors="replace") if props.description else "",
                    kind=kind,
                    free_bytes=int(props.memory_free),
                    total_bytes=int(props.memory_total),
                    device_id=props.device_id.decode().lower() if props.device_id else None,
                )
            )
        return tuple(devices)

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


def buffer_type_overrides(
    overrides: Sequence[tuple[str, str]], devices: GgmlDevices
) -> ctypes.Array[_BufferTypeOverride]:
    """The NULL-pattern-terminated C array for llama_model_params.tensor_buft_overrides."""
    array = (_BufferTypeOverride * (len(overrides) + 1))()
    for index, (pattern, device_name) in enumerate(overrides):
        array[index].pattern = pattern.encode()  # the array keeps the bytes alive (its _objects)
        array[index].buft = devices.buffer_type(device_name)
    return array


def list_devices() -> tuple[DeviceInfo, ...]:
    """The devices this llama.cpp build can place tensors on (GPU backends report free memory here)."""
    llama.llama_backend_init()
    return GgmlDevices().describe()
