"""Whether llama.cpp's extra buffer types (weight repacking, AMX) are safe to use on this machine.

A default llama-cpp-python build compiles llama.cpp's AMX code, which has an open upstream bug: on CPUs
with AMX the first decode of a quantized model dies (SIGSEGV/SIGILL) and f16 weights give wrong logits
for the second sequence of a batch. `use_extra_bufts=False` avoids it, at ~10% of speed elsewhere.

`resolve_use_extra_bufts("auto", ...)` writes tiny models (q4_0, q8_0, f16) and runs the probe in a child
process (`python -m bindings.probe --model q4_0=PATH ...`), which decodes them with extra buffer types on
and every layer on the CPU (`n_gpu_layers=0`: the CPU buffers the routed experts will use, even on a CUDA
build), two sequences in one batch and each alone, and prints the largest logit difference as JSON. A child that
dies by a signal, times out or reports mismatching logits means "off". The verdict is cached per machine
and llama.cpp build in `cache_dir`, so only the first start on a machine pays for the probe.

This module does not import llama_cpp: a crash must happen in the child, never in the server.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SETTINGS: tuple[str, ...] = ("auto", "on", "off")
DEFAULT_PROBE_TIMEOUT_S = 120.0
# Batched and single-sequence logits must agree to 1% of the largest |logit| (at least 0.01 absolute).
# Correct kernels agree exactly or to rounding (≤ 0.024 seen for K-quant tiled matmuls on ~20-wide
# logits); the AMX bug gives another sequence's or garbage logits, off by whole units.
PROBE_RELATIVE_TOLERANCE = 1e-2
# Deaths that say the decode itself crashed. Others (SIGKILL by the OOM killer, SIGTERM) say nothing
# about the kernels and are not cached.
CRASH_SIGNALS: frozenset[int] = frozenset({signal.SIGSEGV, signal.SIGILL, signal.SIGBUS, signal.SIGFPE, signal.SIGABRT})
_CACHE_FORMAT = 2  # 2: probed with every layer on the CPU (format 1 verdicts may have tested a GPU)
PROBE_ARCH = "llama"
PROBE_DTYPES: tuple[str, ...] = ("q4_0", "q8_0", "f16")  # AMX has kernels for the quantized ones; f16 too
_PROJECT_ROOT = Path(__file__).resolve().parents[2]
_LLAMA_LIBRARIES = ("libllama", "libggml", "libggml-base", "libggml-cpu")


@dataclass(frozen=True)
class ProbeVerdict:
    use_extra_bufts: bool
    reason: str
    from_cache: bool


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen3-local"


def default_probe_command() -> tuple[str, ...]:
    return (sys.executable, "-m", "bindings.probe")


def write_probe_models(work_dir: Path) -> list[str]:
    """The tiny models the child decodes, as its `--model LABEL=PATH` arguments."""
    from convert.synth import write_synthetic_model  # deferred: the gguf writer is only needed for a probe

    arguments = []
    for dtype in PROBE_DTYPES:
        path = write_synthetic_model(PROBE_ARCH, work_dir / f"probe-{PROBE_ARCH}-{dtype}.gguf", dtype=dtype)
        arguments += ["--model", f"{dtype}={path}"]
    return arguments


def resolve_use_extra_bufts(
    setting: str,
    *,
    cache_dir: Path | None = None,
    probe_command: Sequence[str] | None = None,
    timeout_s: float = DEFAULT_PROBE_TIMEOUT_S,
) -> ProbeVerdict:
    """Decide `use_extra_bufts` from the setting: "on"/"off" as told, "auto" by the (cached) probe.

    probe_command: the child to run (default: this project's probe), given `--model LABEL=PATH` arguments;
    its last stdout line must be the JSON report that `python -m bindings.probe` prints.
    """
    if setting not in SETTINGS:
        raise ValueError(f"use_extra_bufts must be one of {', '.join(SETTINGS)}, got {setting!r}")
    if setting != "auto":
        verdict = ProbeVerdict(setting == "on", f"set to {setting!r}; no probe", from_cache=False)
        logger.info("extra buffer types %s: %s", "on" if verdict.use_extra_bufts else "off", verdict.reason)
        return verdict
    key = machine_key()
    # One file per machine and build: several llama.cpp builds (venvs) may share one home directory.
    cache_file = (cache_dir or default_cache_dir()) / f"extra-bufts-probe-{key[:16]}.json"
    cached = _read_cached_verdict(cache_file, key)
    if cached is not None:
        logger.info("extra buffer types %s (cached): %s", "on" if cached.use_extra_bufts else "off", cached.reason)
        return cached
    with tempfile.TemporaryDirectory(prefix="qwen3-local-probe-") as work_dir:
        command = (*(probe_command or default_probe_command()), *write_probe_models(Path(work_dir)))
        verdict, cacheable, report = _run_probe(command, timeout_s)
    if cacheable:
        _write_cached_verdict(cache_file, key, verdict, report)
    log = logger.info if verdict.use_extra_bufts else logger.warning
    log("extra buffer types %s: %s", "on" if verdict.use_extra_bufts else "off", verdict.reason)
    return verdict


def machine_key() -> str:
    """Identifies this CPU and llama.cpp build: CPU model, ISA flags and the llama.cpp libraries' bytes."""
    cpu_model, cpu_flags = _cpu_identity()
    digest = hashlib.sha256()
    for part in (platform.machine(), cpu_model, " ".join(sorted(cpu_flags.split())), _llama_cpp_version()):
        digest.update(part.encode())
        digest.update(b"\0")
    for library in _llama_library_files():
        digest.update(library.name.encode())
        digest.update(hashlib.sha256(library.read_bytes()).digest())
    return digest.hexdigest()


def _cpu_identity() -> tuple[str, str]:
    """(model name, ISA flags) from /proc/cpuinfo; on other systems what platform knows."""
    model, flags = "", ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                name, _, value = line.partition(":")
                name = name.strip()
                if name == "model name" and not model:
                    model = value.strip()
                elif name in ("flags", "Features") and not flags:
                    flags = value.strip()
                if model and flags:
                    break
    except OSError:
        pass
    return model or platform.processor(), flags


def _llama_cpp_version() -> str:
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _llama_library_files() -> list[Path]:
    """The shared libraries the bindings load, found without importing them (a rebuild changes them)."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override:
        lib_dir = Path(override)
    else:
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None or not spec.submodule_search_locations:
            return []
        lib_dir = Path(next(iter(spec.submodule_search_locations))) / "lib"
    files = []
    for base_name in _LLAMA_LIBRARIES:
        for suffix in (".so", ".dylib", ".dll"):
            candidate = lib_dir / f"{base_name}{suffix}"
            if candidate.is_file():
                files.append(candidate)
                break
    return files


def _run_probe(command: tuple[str, ...], timeout_s: float) -> tuple[ProbeVerdict, bool, Mapping[str, Any]]:
    """Run the child; return (verdict, whether the verdict may be cached, the child's report)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(_PROJECT_ROOT), env.get("PYTHONPATH"))))
    started = time.monotonic()
    try:
        completed = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout_s,
            env=env,
            cwd=tempfile.gettempdir(),
        )
    except subprocess.TimeoutExpired:
        return _off(f"the probe child did not finish within {timeout_s:g} s"), False, {}
    except OSError as exc:
        return _off(f"the probe child could not start: {exc}"), False, {}
    elapsed_s = time.monotonic() - started
    if completed.returncode < 0:
        signal_number = -completed.returncode
        signal_name = _signal_name(signal_number)
        reason = f"the probe child died with {signal_name} while decoding with extra buffer types"
        return _off(reason), signal_number in CRASH_SIGNALS, {"signal": signal_name}
    if completed.returncode != 0:
        last_line = _last_line(completed.stderr) or "no message"
        return _off(f"the probe child failed with exit code {completed.returncode}: {last_line}"), False, {}
    try:
        report = json.loads(_last_line(completed.stdout))
        models = report["models"]
    except (ValueError, KeyError, TypeError):
        return _off(f"the probe child printed no report: {_last_line(completed.stdout)!r}"), False, {}
    verdict = judge_probe_report(models, elapsed_s)
    # A child whose weights landed off the CPU tested the wrong kernels: its "off" is no verdict on this CPU.
    return verdict, not _off_cpu_buffers(models), report


def judge_probe_report(models: Sequence[Mapping[str, Any]], elapsed_s: float) -> ProbeVerdict:
    """Extra buffer types are fine when every probed model's batched and single logits agree."""
    if not models:
        return _off("the probe child compared no model")
    worst_diff = 0.0
    for model in models:
        dtype = model.get("dtype", "?")
        if off_cpu := _off_cpu_buffers([model]):
            return _off(f"{dtype}: the probe's weights landed in {', '.join(off_cpu)}, not in CPU buffers")
        diff = float(model.get("max_abs_diff", math.inf))
        tolerance = PROBE_RELATIVE_TOLERANCE * max(1.0, float(model.get("max_abs_logit", 1.0)))
        if not model.get("finite", False) or not math.isfinite(diff):
            return _off(f"{dtype} logits with extra buffer types are not finite")
        if diff > tolerance:
            return _off(
                f"{dtype}: logits of two sequences in one batch differ from each alone by {diff:.3g} "
                f"(tolerance {tolerance:.3g})"
            )
        worst_diff = max(worst_diff, diff)
    dtypes = ", ".join(str(model.get("dtype", "?")) for model in models)
    return ProbeVerdict(
        True,
        f"probe passed in {elapsed_s:.1f} s: {dtypes} decode identically batched and alone "
        f"(max |Δlogit| {worst_diff:.3g})",
        from_cache=False,
    )


def _off_cpu_buffers(models: Sequence[Mapping[str, Any]]) -> list[str]:
    """The weight buffers of the probed models that are not CPU buffers (a GPU build with layers offloaded)."""
    return [str(name) for model in models for name in model.get("weight_buffers", ()) if not _is_cpu_buffer(str(name))]


def _is_cpu_buffer(name: str) -> bool:
    """llama.cpp's host weight buffers: CPU, CPU_Mapped, CPU_REPACK, AMX (GPU ones: CUDA0, CUDA_Host...)."""
    return name.upper().startswith(("CPU", "AMX"))


def _off(reason: str) -> ProbeVerdict:
    return ProbeVerdict(False, reason, from_cache=False)


def _signal_name(signal_number: int) -> str:
    try:
        return signal.Signals(signal_number).name
    except ValueError:
        return f"signal {signal_number}"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _read_cached_verdict(cache_file: Path, key: str) -> ProbeVerdict | None:
    try:
        entry = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("format") != _CACHE_FORMAT or entry.get("key") != key:
        return None
    use_extra_bufts, reason = entry.get("use_extra_bufts"), entry.get("reason")
    if not isinstance(use_extra_bufts, bool) or not isinstance(reason, str):
        return None
    return ProbeVerdict(use_extra_bufts, reason, from_cache=True)


def _write_cached_verdict(cache_file: Path, key: str, verdict: ProbeVerdict, report: Mapping[str, Any]) -> None:
    entry = {
        "format": _CACHE_FORMAT,
        "key": key,
        "use_extra_bufts": verdict.use_extra_bufts,
        "reason": verdict.reason,
        "probed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "report": dict(report),
    }
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: two servers starting together never read half a file.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{cache_file.name}.", dir=cache_file.parent)
        try:
            with os.fdopen(fd, "w") as tmp_file:
                json.dump(entry, tmp_file, indent=1)
            os.replace(tmp_name, cache_file)
        finally:
            Path(tmp_name).unlink(missing_ok=True)
    except OSError as exc:
        logger.warning("cannot cache the extra-buffer-type verdict in %s: %s", cache_file, exc)
