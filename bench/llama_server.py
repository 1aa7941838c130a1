"""Build llama.cpp's C++ `llama-server` once, from the pinned llama-cpp-python sdist, and run it.

The binary is the yardstick of the load benchmark: the same llama.cpp our server links, with no Python
in the way. It is built from the `vendor/llama.cpp` inside the llama-cpp-python sdist of the version
pyproject.toml pins, so both sides run the same C code. Everything (the sdist, the build tree, the
binary) lives in a per-user cache outside the repository and is never committed.

    python -m bench.llama_server build [--source-dir DIR]     # prints the binaries' paths
    python -m bench.llama_server serve --port 8091 [--parallel 16 --threads 2 --ctx-size 4096]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.process import ServerSpec, exit_on_termination, run_server

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"

# Only the server and batched-bench targets; no tests, examples, web UI download, HTTPS or curl (nothing here
# needs the network at build time), static libraries so the binaries do not depend on the build tree's layout.
CMAKE_OPTIONS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_COMMON=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
)
BUILD_TARGET = "llama-server"
# llama.cpp's own batched decode loop, no HTTP: the ceiling any server over this llama.cpp can reach.
BATCHED_BENCH_TARGET = "llama-batched-bench"
BUILD_TARGETS = (BUILD_TARGET, BATCHED_BENCH_TARGET)

# The AVX-512 subsets ggml's GGML_AVX512 compiles with (-mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw).
AVX512_BASE = ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")
# ggml's x86 instruction-set options and the /proc/cpuinfo flags each one needs (all of them). AVX_VNNI is the
# VEX encoding (cpuinfo `avx_vnni`), a different extension from AVX512-VNNI (`avx512_vnni`): Zen 4 has only
# the latter and a build with GGML_AVX_VNNI=ON dies there with SIGILL; Zen 5 and recent Intel have both.
X86_FEATURE_OPTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("GGML_SSE42", ("sse4_2",)),
    ("GGML_AVX", ("avx",)),
    ("GGML_AVX2", ("avx2",)),
    ("GGML_AVX_VNNI", ("avx_vnni",)),
    ("GGML_FMA", ("fma",)),
    ("GGML_F16C", ("f16c",)),
    ("GGML_BMI2", ("bmi2",)),
    ("GGML_AVX512", AVX512_BASE),
    ("GGML_AVX512_VBMI", (*AVX512_BASE, "avx512vbmi")),
    ("GGML_AVX512_VNNI", (*AVX512_BASE, "avx512_vnni")),
    ("GGML_AVX512_BF16", (*AVX512_BASE, "avx512_bf16")),
)
# llama.cpp's AMX code is broken upstream (see docs): never compiled in, whatever the CPU has. Our server keeps
# it out at run time (use_extra_bufts=False) or links a build without it; the yardstick must match.
AMX_OPTIONS = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")
# Other people share the CPU: build at low priority and with a small, fixed number of jobs.
DEFAULT_BUILD_JOBS = 2
BUILD_NICENESS = 10


class LlamaServerError(RuntimeError):
    """The sdist could not be fetched or the build failed; the message says where to look."""


@dataclass(frozen=True)
class CacheLayout:
    """Where one llama-cpp-python version's sdist, build tree and binaries live in the cache.

    build_key names the CPU options the tree was configured with, so a cache seen by another CPU (a moved
    home folder, a different VM) never hands out a binary built for instructions this one lacks.
    """

    root: Path
    build_key: str = "default"

    @property
    def sdist_dir(self) -> Path:
        return self.root / "sdist"

    @property
    def build_dir(self) -> Path:
        return self.root / f"build-{self.build_key}"

    @property
    def binary(self) -> Path:
        return self.build_dir / "bin" / BUILD_TARGET

    @property
    def batched_bench(self) -> Path:
        return self.build_dir / "bin" / BATCHED_BENCH_TARGET

    @property
    def build_log(self) -> Path:
        return self.root / "build.log"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"


def default_cache_root() -> Path:
    """The per-user cache folder of qwen3-local (XDG_CACHE_HOME honoured)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qwen3-local"


def cache_layout(
    version: str = LLAMA_CPP_PYTHON_VERSION, cache_root: Path | None = None, cpu_options: Sequence[str] | None = None
) -> CacheLayout:
    """The cache of one version; cpu_options (default: this CPU's) choose the build folder."""
    options = this_cpu_build_options() if cpu_options is None else tuple(cpu_options)
    return CacheLayout(
        root=(cache_root or default_cache_root()) / f"llama-server-{version}", build_key=build_key(options)
    )


def build_key(cpu_options: Sequence[str]) -> str:
    """A short, stable name for a set of CPU build options."""
    return hashlib.sha256("\n".join(sorted(cpu_options)).encode()).hexdigest()[:12]


def cpu_flags(cpuinfo_text: str) -> frozenset[str]:
    """The instruction-set flags every processor in /proc/cpuinfo lists (x86 `flags` lines; empty elsewhere)."""
    per_processor = [
        frozenset(value.split())
        for key, _, value in (line.partition(":") for line in cpuinfo_text.splitlines())
        if key.strip() == "flags"
    ]
    return frozenset.intersection(*per_processor) if per_processor else frozenset()


def cpu_has_amx(cpuinfo_text: str) -> bool:
    """True when /proc/cpuinfo's flags list AMX tiles (llama.cpp's AMX path is broken there)."""
    return "amx_tile" in cpu_flags(cpuinfo_text)


def cpu_build_options(flags: frozenset[str]) -> tuple[str, ...]:
    """ggml's CMake instruction-set options for a CPU with these /proc/cpuinfo flags.

    Each x86 option is ON exactly when the CPU lists every flag it compiles for, with GGML_NATIVE=OFF so the
    compiler's own guess (-march=native) cannot add anything; AMX stays OFF. Without x86 flags (another
    architecture, or no /proc/cpuinfo) the compiler's native detection is all there is: GGML_NATIVE=ON.
    """
    if not flags:
        return ("-DGGML_NATIVE=ON",)
    options = ["-DGGML_NATIVE=OFF"]
    for option, needed in X86_FEATURE_OPTIONS:
        options.append(f"-D{option}={'ON' if flags.issuperset(needed) else 'OFF'}")
    options += [f"-D{option}=OFF" for option in AMX_OPTIONS]
    return tuple(options)


def _this_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def this_cpu_has_amx() -> bool:
    return cpu_has_amx(_this_cpuinfo())


def this_cpu_build_options() -> tuple[str, ...]:
    return cpu_build_options(cpu_flags(_this_cpuinfo()))


def vendor_dir(extracted_sdist: Path) -> Path:
    return extracted_sdist / "vendor" / "llama.cpp"


def fetch_sdist(layout: CacheLayout, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Download (pip) and extract the llama-cpp-python sdist into the cache; return its vendor/llama.cpp."""
    extracted = layout.sdist_dir / f"llama_cpp_python-{version}"
    if (vendor_dir(extracted) / "CMakeLists.txt").is_file():
        return vendor_dir(extracted)
    layout.sdist_dir.mkdir(parents=True, exist_ok=True)
    download = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        f"llama-cpp-python=={version}", "--dest", str(layout.sdist_dir),
    ]  # fmt: skip
    completed = subprocess.run(download, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise LlamaServerError(f"pip download of llama-cpp-python=={version} failed: {completed.stderr[-500:]}")
    archives = sorted(layout.sdist_dir.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not archives:
        raise LlamaServerError(f"pip download left no llama_cpp_python-{version}.tar.gz in {layout.sdist_dir}")
    with tarfile.open(archives[0]) as archive:
        archive.extractall(layout.sdist_dir, filter="data")
    if not (vendor_dir(extracted) / "CMakeLists.txt").is_file():
        raise LlamaServerError(f"{archives[0]} has no vendor/llama.cpp/CMakeLists.txt")
    return vendor_dir(extracted)


def cmake_configure_command(
    source_dir: Path, build_dir: Path, generator: str | None, cpu_options: Sequence[str] = ()
) -> list[str]:
    command = ["cmake", "-S", str(source_dir), "-B", str(build_dir), *CMAKE_OPTIONS, *cpu_options]
    if generator is not None:
        command += ["-G", generator]
    return command


def cmake_build_command(build_dir: Path, jobs: int) -> list[str]:
    return ["cmake", "--build", str(build_dir), "--target", *BUILD_TARGETS, "-j", str(jobs)]


def _niced(command: list[str]) -> list[str]:
    return ["nice", "-n", str(BUILD_NICENESS), *command] if shutil.which("nice") else command


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Serialise builders: a second `ensure_llama_server` waits for the first and then reuses its binary."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_logged(command: list[str], log: Path) -> None:
    with log.open("a") as sink:
        sink.write(f"$ {' '.join(command)}\n")
        sink.flush()
        completed = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, check=False)
    if completed.returncode != 0:
        raise LlamaServerError(f"{command[0:4]} failed with exit code {completed.returncode}; see {log}")


def ensure_llama_server(
    source_dir: Path | None = None,
    cache_root: Path | None = None,
    jobs: int = DEFAULT_BUILD_JOBS,
    version: str = LLAMA_CPP_PYTHON_VERSION,
) -> Path:
    """Return the cached llama-server binary, building it first if it is not there yet.

    source_dir: an already extracted `vendor/llama.cpp` of the pinned sdist; without it the sdist is
    downloaded with pip into the cache. llama-batched-bench is built alongside, in the same tree
    (`cache_layout(...).batched_bench`), with the same options.
    """
    cpu_options = this_cpu_build_options()
    layout = cache_layout(version, cache_root, cpu_options)
    if _built(layout):
        return layout.binary
    with _exclusive(layout.lock_file):
        if _built(layout):  # another process built it while we waited for the lock
            return layout.binary
        source = source_dir if source_dir is not None else fetch_sdist(layout, version)
        if not (source / "CMakeLists.txt").is_file():
            raise LlamaServerError(f"{source} is not a llama.cpp source tree (no CMakeLists.txt)")
        if shutil.which("cmake") is None:
            raise LlamaServerError("cmake is not installed; it is needed to build llama-server")
        generator = "Ninja" if shutil.which("ninja") else None
        layout.build_log.write_text(f"building {', '.join(BUILD_TARGETS)} from {source}\n")
        configure = cmake_configure_command(source, layout.build_dir, generator, cpu_options)
        _run_logged(_niced(configure), layout.build_log)
        _run_logged(_niced(cmake_build_command(layout.build_dir, jobs)), layout.build_log)
        if not _built(layout):
            raise LlamaServerError(
                f"the build finished but {layout.build_dir / 'bin'} lacks a binary; see {layout.build_log}"
            )
        return layout.binary


def _built(layout: CacheLayout) -> bool:
    return layout.binary.is_file() and layout.batched_bench.is_file()


def batched_bench_binary(llama_server_binary: Path) -> Path:
    """The llama-batched-bench built in the same tree as this llama-server."""
    return llama_server_binary.with_name(BATCHED_BENCH_TARGET)


@dataclass(frozen=True)
class LlamaServerSettings:
    """What a llama-server run is started with: the same knobs our server gets in a comparison."""

    binary: Path
    model_path: Path
    port: int
    threads: int = 2
    parallel: int = 16
    ctx_size: int = 4096
    host: str = "127.0.0.1"
    no_repack: bool = False
    extra_args: tuple[str, ...] = ()


def llama_server_command(settings: LlamaServerSettings) -> list[str]:
    """The command line; `--no-repack` keeps weights out of the AMX buffer where AMX is broken."""
    command = [
        str(settings.binary),
        "--model", str(settings.model_path),
        "--host", settings.host,
        "--port", str(settings.port),
        "--threads", str(settings.threads),
        "--threads-batch", str(settings.threads),
        "--parallel", str(settings.parallel),
        "--ctx-size", str(settings.ctx_size),
        "--no-webui",
    ]  # fmt: skip
    if settings.no_repack:
        command.append("--no-repack")
    return [*command, *settings.extra_args]


def llama_server_spec(settings: LlamaServerSettings) -> ServerSpec:
    """A ServerSpec that bench.process can start, wait for (/health answers 200 once loaded) and stop."""
    return ServerSpec(
        name="llama-server",
        command=tuple(llama_server_command(settings)),
        base_url=f"http://{settings.host}:{settings.port}/v1",
        health_url=f"http://{settings.host}:{settings.port}/health",
    )


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.llama_server", description=__doc__.splitlines()[0])
    parser.add_argument("--source-dir", type=Path, help="extracted vendor/llama.cpp of the pinned sdist")
    parser.add_argument("--cache-root", type=Path, help=f"cache folder (default {default_cache_root()})")
    parser.add_argument("--jobs", type=int, default=DEFAULT_BUILD_JOBS, help="parallel compile jobs")
    commands = parser.add_subparsers(dest="action", required=True)
    commands.add_parser("build", help="build (once) and print the binary's path")
    serve = commands.add_parser("serve", help="build if needed, then serve a model until Ctrl-C")
    serve.add_argument("--model", default="smollm2-135m-instruct", help="models.yaml name or .gguf path")
    serve.add_argument("--port", type=int, default=8091)
    serve.add_argument("--threads", type=int, default=2)
    serve.add_argument("--parallel", type=int, default=16)
    serve.add_argument("--ctx-size", type=int, default=4096)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        binary = ensure_llama_server(args.source_dir, args.cache_root, args.jobs)
        if args.action == "build":
            print(binary)
            print(batched_bench_binary(binary))
            return 0
        from registry.models import RegistryError, resolve_model

        try:
            model_path = resolve_model(args.model).path
        except RegistryError as exc:
            raise LlamaServerError(str(exc)) from exc
        settings = LlamaServerSettings(
            binary=binary,
            model_path=model_path,
            port=args.port,
            threads=args.threads,
            parallel=args.parallel,
            ctx_size=args.ctx_size,
            no_repack=this_cpu_has_amx(),
        )
        exit_on_termination()
        with run_server(llama_server_spec(settings)) as running:
            print(f"llama-server ready at {running.spec.base_url} (Ctrl-C stops it)", flush=True)
            running.wait()
        return 0
    except LlamaServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
