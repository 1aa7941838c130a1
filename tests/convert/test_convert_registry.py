"""models.yaml: the shipped file is valid, and each kind of bad field is reported by its path."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry.models import RegistryError, load_registry, resolve_model

GOOD_HUB = """    hub:
      repo: org/Model-GGUF
      default_quant: Q4_K_M
      quants:
        Q4_K_M: "Model-Q4_K_M*.gguf"
"""


def _registry_file(tmp_path: Path, body: str, default: str = "m") -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(f"default: {default}\nmodels:\n  m:\n{body}")
    return path


def test_the_shipped_models_yaml_is_valid() -> None:
    registry = load_registry()
    assert registry.default == "smollm2-135m-instruct"
    assert resolve_model(registry.default).path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    qwen = registry.entry("qwen3-next-80b-a3b-instruct")
    assert qwen.hub is not None
    assert qwen.hub.repo == "Qwen/Qwen3-Next-80B-A3B-Instruct-GGUF"
    assert qwen.hub.default_quant == "Q4_K_M"
    assert qwen.safetensors_repo == "Qwen/Qwen3-Next-80B-A3B-Instruct"
    # Qwen's recommended sampling for the Instruct model; SmolLM2 recommends none
    assert qwen.sampling.given() == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0}
    assert registry.entry(registry.default).sampling.given() == {}
    thinking = registry.entry("qwen3-next-80b-a3b-thinking")
    assert thinking.hub is not None
    assert thinking.hub.repo == "Qwen/Qwen3-Next-80B-A3B-Thinking-GGUF"
    assert thinking.hub.default_quant == "Q4_K_M"
    assert thinking.safetensors_repo == "Qwen/Qwen3-Next-80B-A3B-Thinking"
    assert thinking.sampling.given() == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}


@pytest.mark.parametrize(
    ("body", "where", "what"),
    [
        (GOOD_HUB + "      sha256:\n        Model-Q4_K_M.gguf: ABC\n", "models.m.hub.sha256", "64 lowercase hex"),
        (GOOD_HUB.replace("default_quant: Q4_K_M", "default_quant: Q8_0"), "models.m.hub", "default_quant 'Q8_0'"),
        (GOOD_HUB.replace("org/Model-GGUF", "just-a-name"), "models.m.hub.repo", "'owner/name'"),
        (GOOD_HUB.replace('"Model-Q4_K_M*.gguf"', '"Model-Q4_K_M*"'), "models.m.hub.quants", "must end in .gguf"),
        (GOOD_HUB.replace("    hub:", "    hubb:"), "models.m.hubb", "Extra inputs"),
        (GOOD_HUB + "    context: -5\n", "models.m.context", "greater than 0"),
        (GOOD_HUB + "    safetensors_repo: no-slash\n", "models.m.safetensors_repo", "'owner/name'"),
        (GOOD_HUB + "    sampling:\n      temperature: 2.5\n", "models.m.sampling.temperature", "less than or equal"),
        (GOOD_HUB + "    sampling:\n      top_p: -0.1\n", "models.m.sampling.top_p", "greater than or equal"),
        (GOOD_HUB + "    sampling:\n      top_k: 1.5\n", "models.m.sampling.top_k", "valid integer"),
        (GOOD_HUB + "    sampling:\n      min_p: high\n", "models.m.sampling.min_p", "valid number"),
        (GOOD_HUB + "    sampling:\n      repeat_penalty: 0\n", "models.m.sampling.repeat_penalty", "greater than 0"),
        (GOOD_HUB + "    sampling:\n      top_a: 0.1\n", "models.m.sampling.top_a", "Extra inputs"),
    ],
)
def test_a_bad_field_is_named(tmp_path: Path, body: str, where: str, what: str) -> None:
    with pytest.raises(RegistryError) as error:
        load_registry(_registry_file(tmp_path, body))
    message = str(error.value)
    assert f": {where}: " in message
    assert what in message


def test_default_must_be_listed_and_the_file_must_parse(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="default model 'other' is not listed"):
        load_registry(_registry_file(tmp_path, GOOD_HUB, default="other"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [unclosed")
    with pytest.raises(RegistryError, match="cannot read"):
        load_registry(broken)


def test_a_valid_sha256_is_kept(tmp_path: Path) -> None:
    digest = "0123456789abcdef" * 4
    body = GOOD_HUB + f"      sha256:\n        Model-Q4_K_M.gguf: {digest}\n"
    registry = load_registry(_registry_file(tmp_path, body))
    hub = registry.entry("m").hub
    assert hub is not None and hub.sha256 == {"Model-Q4_K_M.gguf": digest}
