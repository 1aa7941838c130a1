"""The extra-buffer-type probe: the real child on this machine, and injected children that crash or lie."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

import pytest

from server.boot.bufts_probe import ProbeVerdict, judge_probe_report, machine_key, resolve_use_extra_bufts


def child_script(tmp_path: Path, name: str, body: str) -> tuple[str, ...]:
    script = tmp_path / f"{name}.py"
    script.write_text(body)
    return (sys.executable, str(script))


def segfaulting_child(tmp_path: Path) -> tuple[str, ...]:
    return child_script(
        tmp_path,
        "segfault",
        "import os, resource, signal\n"
        "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n"
        "os.kill(os.getpid(), signal.SIGSEGV)\n",
    )


def reporting_child(
    tmp_path: Path, max_abs_diff: float, f16_buffers: tuple[str, ...] = ("CPU_Mapped",)
) -> tuple[str, ...]:
    report = {
        "models": [
            {"dtype": "q4_0", "max_abs_diff": 0.0, "max_abs_logit": 9.0, "finite": True, "n_compared": 10},
            {
                "dtype": "f16",
                "max_abs_diff": max_abs_diff,
                "max_abs_logit": 9.0,
                "finite": True,
                "n_compared": 10,
                "weight_buffers": list(f16_buffers),
            },
        ]
    }
    return child_script(tmp_path, "report", f"print('llama.cpp noise')\nprint({json.dumps(json.dumps(report))})\n")


def cache_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("extra-bufts-probe-*.json"))


# Runs the real probe child (`python -m bindings.probe ARGS`) and records how it ended and what it printed,
# then ends the same way: the parent judges exactly what the real child did.
RECORDING_CHILD = """\
import json, os, signal, subprocess, sys
child = subprocess.run([sys.executable, "-m", "bindings.probe", *sys.argv[1:]], capture_output=True, text=True)
with open({record!r}, "w") as record:
    json.dump({{"returncode": child.returncode, "stdout": child.stdout}}, record)
sys.stdout.write(child.stdout)
sys.stderr.write(child.stderr)
sys.stdout.flush()
if child.returncode < 0:
    import resource
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.kill(os.getpid(), -child.returncode)
sys.exit(child.returncode)
"""


def is_cpu_weight_buffer(name: str) -> bool:
    """Host buffers the CPU backend computes from: CPU, CPU_Mapped, CPU_REPACK, AMX (never CUDA0, CUDA_Host...)."""
    return name.upper().startswith(("CPU", "AMX"))


@pytest.mark.slow
def test_real_probe_verdict_is_what_the_child_showed_and_is_cached(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Holds on any CPU: without AMX the child decodes identically (on); with AMX it may crash or mismatch (off).
    cache_dir = tmp_path / "cache"
    record = tmp_path / "child.json"
    recording = child_script(tmp_path, "record", RECORDING_CHILD.format(record=str(record)))
    with caplog.at_level(logging.INFO, logger="server.boot.bufts_probe"):
        first = resolve_use_extra_bufts("auto", cache_dir=cache_dir, probe_command=recording)
    child = json.loads(record.read_text())
    assert first.from_cache is False
    if child["returncode"] == 0:
        report = json.loads(child["stdout"].strip().splitlines()[-1])
        assert [model["dtype"] for model in report["models"]] == ["q4_0", "q8_0", "f16"]
        for model in report["models"]:
            # n_gpu_layers=0: the probe tested the CPU buffers the experts use, whatever the build
            assert model["weight_buffers"] and all(is_cpu_weight_buffer(name) for name in model["weight_buffers"])
        expected = judge_probe_report(report["models"], elapsed_s=0.0)
        assert first.use_extra_bufts is expected.use_extra_bufts
        if expected.use_extra_bufts:
            assert "q4_0, q8_0, f16" in first.reason
        else:
            assert first.reason == expected.reason
    else:
        # The only other outcome the probe allows is the AMX crash: a signal, never an error exit.
        assert child["returncode"] < 0, child
        assert first.use_extra_bufts is False
        assert signal.Signals(-child["returncode"]).name in first.reason
    said = "extra buffer types on" if first.use_extra_bufts else "extra buffer types off"
    assert any(said in record.message for record in caplog.records)
    [cache_file] = cache_files(cache_dir)
    entry = json.loads(cache_file.read_text())
    assert entry["key"] == machine_key() and entry["use_extra_bufts"] is first.use_extra_bufts
    # A cached verdict runs no child: a child that would crash is never started.
    second = resolve_use_extra_bufts("auto", cache_dir=cache_dir, probe_command=segfaulting_child(tmp_path))
    assert second == ProbeVerdict(first.use_extra_bufts, first.reason, from_cache=True)


def test_crashing_child_turns_extra_bufts_off_and_is_cached(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    verdict = resolve_use_extra_bufts("auto", cache_dir=cache_dir, probe_command=segfaulting_child(tmp_path))
    assert verdict.use_extra_bufts is False and verdict.from_cache is False
    assert "SIGSEGV" in verdict.reason
    again = resolve_use_extra_bufts("auto", cache_dir=cache_dir, probe_command=reporting_child(tmp_path, 0.0))
    assert again == ProbeVerdict(False, verdict.reason, from_cache=True)


def test_mismatching_child_turns_extra_bufts_off(tmp_path: Path) -> None:
    verdict = resolve_use_extra_bufts(
        "auto", cache_dir=tmp_path / "cache", probe_command=reporting_child(tmp_path, 3.5)
    )
    assert verdict.use_extra_bufts is False
    assert "f16" in verdict.reason and "3.5" in verdict.reason
    assert len(cache_files(tmp_path / "cache")) == 1


def test_agreeing_child_turns_extra_bufts_on(tmp_path: Path) -> None:
    verdict = resolve_use_extra_bufts(
        "auto", cache_dir=tmp_path / "cache", probe_command=reporting_child(tmp_path, 0.02)
    )
    assert verdict.use_extra_bufts is True and "0.02" in verdict.reason


def test_hanging_child_times_out_and_is_not_cached(tmp_path: Path) -> None:
    hanging = child_script(tmp_path, "hang", "import time\ntime.sleep(60)\n")
    verdict = resolve_use_extra_bufts("auto", cache_dir=tmp_path / "cache", probe_command=hanging, timeout_s=1.0)
    assert verdict.use_extra_bufts is False and "within 1 s" in verdict.reason
    assert cache_files(tmp_path / "cache") == []


def test_failing_child_is_off_with_its_message_and_not_cached(tmp_path: Path) -> None:
    failing = child_script(
        tmp_path, "fail", "import sys\nprint('no such model writer', file=sys.stderr)\nsys.exit(3)\n"
    )
    verdict = resolve_use_extra_bufts("auto", cache_dir=tmp_path / "cache", probe_command=failing)
    assert verdict.use_extra_bufts is False
    assert "exit code 3" in verdict.reason and "no such model writer" in verdict.reason
    assert cache_files(tmp_path / "cache") == []


def test_corrupt_cache_is_ignored(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    resolve_use_extra_bufts("auto", cache_dir=cache_dir, probe_command=reporting_child(tmp_path, 0.0))
    [cache_file] = cache_files(cache_dir)
    cache_file.write_text("{not json")
    verdict = resolve_use_extra_bufts("auto", cache_dir=cache_dir, probe_command=segfaulting_child(tmp_path))
    assert verdict.use_extra_bufts is False and verdict.from_cache is False


@pytest.mark.parametrize("setting", ["on", "off"])
def test_on_and_off_skip_the_probe(tmp_path: Path, setting: str) -> None:
    verdict = resolve_use_extra_bufts(setting, cache_dir=tmp_path / "cache", probe_command=segfaulting_child(tmp_path))
    assert verdict == ProbeVerdict(setting == "on", f"set to {setting!r}; no probe", from_cache=False)
    assert not (tmp_path / "cache").exists()


def test_unknown_setting_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="auto, on, off"):
        resolve_use_extra_bufts("maybe", cache_dir=tmp_path)


def test_judge_rejects_non_finite_and_empty_reports() -> None:
    nan_report = [{"dtype": "q8_0", "max_abs_diff": 0.0, "max_abs_logit": 1.0, "finite": False}]
    assert judge_probe_report(nan_report, 1.0).use_extra_bufts is False
    assert judge_probe_report([], 1.0).use_extra_bufts is False


@pytest.mark.parametrize("gpu_buffer", ["CUDA0", "CUDA_Host", "Vulkan0"])
def test_weights_outside_cpu_buffers_are_refused_and_not_cached(tmp_path: Path, gpu_buffer: str) -> None:
    # Logits that agree say nothing about the CPU kernels when the weights sat in a GPU's (or its pinned host) buffer
    child = reporting_child(tmp_path, 0.0, f16_buffers=("CPU_Mapped", gpu_buffer))
    verdict = resolve_use_extra_bufts("auto", cache_dir=tmp_path / "cache", probe_command=child)
    assert verdict.use_extra_bufts is False
    assert f"f16: the probe's weights landed in {gpu_buffer}, not in CPU buffers" == verdict.reason
    assert cache_files(tmp_path / "cache") == []  # a probe that tested the wrong device decides nothing for later


def test_judge_accepts_every_cpu_buffer_kind() -> None:
    models = [
        {"dtype": "q4_0", "max_abs_diff": 0.0, "max_abs_logit": 1.0, "finite": True, "weight_buffers": names}
        for names in (["CPU"], ["CPU_Mapped", "CPU_REPACK"], ["AMX", "CPU_Mapped"])
    ]
    assert judge_probe_report(models, 1.0).use_extra_bufts is True
