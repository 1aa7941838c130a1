"""models.yaml's per-model sampling: applied to every parameter a request leaves out, shown by /v1/models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bindings.protocol import SamplingParams
from server.api.generation import sampling_params
from server.api.schemas import ChatCompletionRequest
from server.engine.fake_backend import FakeBackend

from .helpers import MODEL, Served, assert_openai_error, serve

pytestmark = pytest.mark.anyio

HI = [{"role": "user", "content": "hi"}]
MODEL_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0}


def models_file(tmp_path: Path) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(
        "default: tuned\nmodels:\n  tuned:\n    sampling:\n"
        "      temperature: 0.7\n      top_p: 0.8\n      top_k: 20\n      min_p: 0\n"
        "  plain:\n    description: no sampling of its own\n"
    )
    return path


def record_samplers(served: Served) -> list[SamplingParams]:
    """Every SamplingParams the engine hands the backend from now on (one per choice)."""
    seen: list[SamplingParams] = []
    original = served.backend.new_sampler

    def recording(sampler_id: int, params: SamplingParams) -> None:
        seen.append(params)
        original(sampler_id, params)

    served.backend.new_sampler = recording  # type: ignore[method-assign]
    return seen


async def generate(served: Served, route: str, **body: Any) -> None:
    payload = {"messages": HI} if route == "/v1/chat/completions" else {"prompt": "hi"}
    response = await served.client.post(route, json={**payload, "max_tokens": 2, **body})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
async def test_a_request_gets_the_model_defaults_for_what_it_leaves_out(tmp_path: Path, route: str) -> None:
    async with serve(models_file=models_file(tmp_path), model="tuned") as served:
        seen = record_samplers(served)
        await generate(served, route)
        await generate(served, route, temperature=1.3, top_k=5, min_p=0.1, top_p=None)
        await generate(served, route, top_p=0.95, presence_penalty=0.5)
    without, own, mixed = seen
    assert (without.temperature, without.top_p, without.top_k, without.min_p) == (0.7, 0.8, 20, 0.0)
    assert (own.temperature, own.top_p, own.top_k, own.min_p) == (1.3, 0.8, 5, 0.1)  # null top_p: the model's
    assert (mixed.temperature, mixed.top_p, mixed.top_k, mixed.presence_penalty) == (0.7, 0.95, 20, 0.5)
    # what models.yaml does not set stays the server's default
    assert (without.repeat_penalty, without.presence_penalty, without.frequency_penalty) == (1.0, 0.0, 0.0)


async def test_the_models_endpoints_show_the_defaults(tmp_path: Path) -> None:
    async with serve(models_file=models_file(tmp_path), model="tuned") as served:
        card = (await served.client.get(f"/v1/models/{MODEL}")).json()
        assert card["id"] == MODEL and card["object"] == "model" and card["owned_by"] == "qwen3-local"
        assert card["sampling_defaults"] == MODEL_SAMPLING and type(card["sampling_defaults"]["top_k"]) is int
        assert (await served.client.get("/v1/models")).json()["data"] == [card]
        assert_openai_error(await served.client.get("/v1/models/other"), 404, param="model", code="model_not_found")


async def test_no_model_defaults_means_the_server_defaults(tmp_path: Path) -> None:
    gguf = tmp_path / "tuned.gguf"  # a path, even one named like a registry model, has no models.yaml entry
    gguf.write_bytes(b"GGUF")
    for model in ("plain", str(gguf)):
        async with serve(models_file=models_file(tmp_path), model=model, default_top_k=33) as served:
            card = (await served.client.get(f"/v1/models/{MODEL}")).json()
            assert card["sampling_defaults"] == {}
            seen = record_samplers(served)
            await generate(served, "/v1/chat/completions")
        assert seen == [SamplingParams(max_tokens=2, top_k=33)]


def test_precedence_request_then_model_then_server() -> None:
    info = FakeBackend().info

    def params(**body: Any) -> SamplingParams:
        request = ChatCompletionRequest.model_validate({"messages": HI, **body})
        return sampling_params(
            request,
            info,
            max_tokens=None,
            logprobs=False,
            top_logprobs=0,
            default_top_k=40,
            model_defaults={"temperature": 0.7, "top_k": 20, "repeat_penalty": 1.05, "frequency_penalty": 0.2},
        )

    assert params() == SamplingParams(temperature=0.7, top_k=20, repeat_penalty=1.05, frequency_penalty=0.2)
    assert params(temperature=0.0, top_k=0, frequency_penalty=0.0, top_p=0.5) == SamplingParams(
        temperature=0.0, top_k=0, repeat_penalty=1.05, frequency_penalty=0.0, top_p=0.5
    )
