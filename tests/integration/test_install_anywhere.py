"""`pip install .` (not editable) into a fresh virtualenv, then the installed copy runs from an empty directory:
`python -m server --help`, `qwen3-local --help`, and `python -m server` serving the default model.

The wheel is built from a copy of the checkout without its tests, caches or virtualenv, and installed with
--no-deps into a new virtualenv without system site-packages. Its dependencies (llama-cpp-python, compiled
for minutes) are not reinstalled: a .pth file appends this interpreter's site-packages to the new one's
sys.path. A .pth file's own lines are not processed as .pth files, so the checkout's editable-install hook
stays inactive there: `server` can only come from the new virtualenv, which the test checks.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import pytest

from registry.models import load_registry
from tests.integration.conftest import CacheHome, start_server, stop_server

ROOT = Path(__file__).resolve().parents[2]
NOT_IN_A_BUILD = {".git", ".venv", "venv", "build", "dist", "tests", "bench", "docs", "out"}  # top level only


def copy_checkout(destination: Path) -> Path:
    def ignore(directory: str, names: list[str]) -> set[str]:
        top = Path(directory).resolve() == ROOT
        return {
            name
            for name in names
            if (top and (name in NOT_IN_A_BUILD or name.startswith(".")))
            or name == "__pycache__"
            or name.endswith((".egg-info", ".pyc", ".gguf"))
        }

    shutil.copytree(ROOT, destination, ignore=ignore)
    return destination


def run(*command: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
def test_the_wheel_installs_into_a_fresh_venv_and_serves_from_any_directory(tmp_path: Path) -> None:
    started = time.monotonic()
    source = copy_checkout(tmp_path / "src")
    assert not (source / "registry" / "models.yaml").exists()  # the checkout keeps one models.yaml, at the top
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
        tmp_path / "dist", source)  # fmt: skip
    [wheel] = (tmp_path / "dist").glob("qwen3_local-*.whl")

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel)
    site_packages = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    # only now (pip must not see, let alone uninstall, what lives here): the dependencies, from this interpreter
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site_packages / "_dependencies_from_the_test_venv.pth").write_text("\n".join(paths) + "\n")

    cache_home = CacheHome(tmp_path / "cache-home")
    env = {k: v for k, v in cache_home.env().items() if k != "VIRTUAL_ENV"}
    anywhere = tmp_path / "anywhere"
    anywhere.mkdir()
    paths = "[server.__file__, str(registry.models.DEFAULT_REGISTRY_PATH)]"
    probe = f"import json, server, registry.models; print(json.dumps({paths}))"
    where = json.loads(run(python, "-c", probe, cwd=anywhere, env=env))
    assert Path(where[0]).is_relative_to(site_packages), where
    assert Path(where[1]) == site_packages / "registry" / "models.yaml"
    assert Path(where[1]).read_bytes() == (ROOT / "models.yaml").read_bytes()

    help_text = run(python, "-m", "server", "--help", cwd=anywhere, env=env)
    assert "--model" in help_text and "--allow-no-auth" in help_text
    assert run(venv / "bin" / "qwen3-local", "--help", cwd=anywhere, env=env) == help_text

    default_model = load_registry(ROOT / "models.yaml").default
    server = start_server(["--threads", "2"], tmp_path / "server.log", cache_home, python=str(python), cwd=anywhere)
    try:
        assert [m["id"] for m in httpx.get(server.api_url + "/models").json()["data"]] == [default_model]
        answer = httpx.post(
            server.api_url + "/chat/completions",
            json={"messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 16, "temperature": 0},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == default_model
        assert "4" in answer.json()["choices"][0]["message"]["content"]
    finally:
        stop_server(server)
    assert not list(anywhere.iterdir())  # nothing written to the working directory
    print(f"wheel built, installed and served in {time.monotonic() - started:.1f} s")
