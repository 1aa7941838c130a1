"""POST /v1/embeddings against the fake engine and fake embedder: shapes, encodings, batching across inputs and
requests, interleaving with chat steps, every 400, and how embeddings are turned on."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from registry.models import load_registry
from server.api.state import app_server_state
from server.app import create_app
from server.boot.loader import embeddings_wanted
from server.engine.embedding_queue import EmbeddingJob, EmbeddingQueue
from server.engine.engine import Engine, EngineConfig
from server.engine.fake_backend import N_VOCAB, FakeBackend, FakeBackendConfig
from server.engine.fake_embedder import FakeEmbedder, FakeEmbedderConfig
from server.settings import Settings, load_settings

from .helpers import MODEL, Served, serve, wait_for

pytestmark = pytest.mark.anyio


class EmbeddingServed(Served):
    embedder: FakeEmbedder


@asynccontextmanager
async def serve_embeddings(
    embedder_config: FakeEmbedderConfig | None = None,
    backend_config: FakeBackendConfig | None = None,
    **settings: Any,
) -> AsyncIterator[EmbeddingServed]:
    backend = FakeBackend(backend_config or FakeBackendConfig())
    embedder = FakeEmbedder(embedder_config, backend=backend)
    engine = Engine(backend, EngineConfig(), embedder=embedder)
    app = create_app(Settings(served_model_name=MODEL, **settings), engine_factory=lambda: engine)
    async with app.router.lifespan_context(app):
        await wait_for(lambda: app_server_state(app).status != "loading")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            served = EmbeddingServed(app, client, backend, engine)
            served.embedder = embedder
            yield served
    assert embedder.closed  # the engine closes the embedding context with the model


def expected(served: EmbeddingServed, text: str | list[int]) -> np.ndarray:
    tokens = text if isinstance(text, list) else served.backend.tokenize(text, add_special=True, parse_special=True)
    vector = served.embedder.vector(tokens).astype(np.float64)
    return vector / np.linalg.norm(vector)


async def embed(served: Served, status: int = 200, **body: Any) -> dict[str, Any]:
    response = await served.client.post("/v1/embeddings", json={"model": MODEL, **body})
    assert response.status_code == status, response.text
    result: dict[str, Any] = response.json()
    return result


def vectors(body: dict[str, Any]) -> list[np.ndarray]:
    assert [item["index"] for item in body["data"]] == list(range(len(body["data"])))
    return [np.asarray(item["embedding"], dtype=np.float64) for item in body["data"]]


async def test_a_string_gets_one_normalized_vector_with_usage() -> None:
    async with serve_embeddings() as served:
        body = await embed(served, input="hello world")
        assert body["object"] == "list" and body["model"] == MODEL
        assert body["data"][0]["object"] == "embedding"
        (vector,) = vectors(body)
        assert vector.shape == (16,)
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(vector, expected(served, "hello world"), atol=1e-6)
        assert body["usage"] == {"prompt_tokens": len("hello world"), "total_tokens": len("hello world")}


async def test_base64_is_little_endian_float32_of_the_same_vector() -> None:
    async with serve_embeddings() as served:
        floats = vectors(await embed(served, input=["one", "two"]))
        encoded = await embed(served, input=["one", "two"], encoding_format="base64")
        for item, vector in zip(encoded["data"], floats, strict=True):
            decoded = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
            np.testing.assert_array_equal(decoded, vector.astype(np.float32))


async def test_every_input_shape_keeps_its_order() -> None:
    async with serve_embeddings() as served:
        texts = ["alpha", "beta", "gamma"]
        for got, text in zip(vectors(await embed(served, input=texts)), texts, strict=True):
            np.testing.assert_allclose(got, expected(served, text), atol=1e-6)
        (single,) = vectors(await embed(served, input=[104, 105]))
        np.testing.assert_allclose(single, expected(served, [104, 105]), atol=1e-6)
        token_lists = [[104, 105], [120], [97, 98, 99]]
        body = await embed(served, input=token_lists)
        for got, tokens in zip(vectors(body), token_lists, strict=True):
            np.testing.assert_allclose(got, expected(served, tokens), atol=1e-6)
        assert body["usage"]["prompt_tokens"] == 6
        mixed = await embed(served, input=["hi", [104, 105]])
        np.testing.assert_allclose(vectors(mixed)[0], vectors(mixed)[1], atol=1e-6)  # "hi" is those bytes


async def test_many_inputs_are_cut_into_decodes_that_fit() -> None:
    config = FakeEmbedderConfig(n_batch=32, n_seq_max=4)
    async with serve_embeddings(config) as served:
        texts = [f"text number {index}" for index in range(10)] + ["x" * 30]
        got = vectors(await embed(served, input=texts))
        for vector, text in zip(got, texts, strict=True):
            np.testing.assert_allclose(vector, expected(served, text), atol=1e-6)
        batches = served.embedder.batches
        assert all(len(batch) <= 4 and sum(map(len, batch)) <= 32 for batch in batches)
        assert sum(len(batch) for batch in batches) == len(texts)
        assert len(batches) < len(texts)  # several inputs share a decode


def test_the_queue_packs_inputs_of_several_requests_into_one_decode() -> None:
    queue = EmbeddingQueue(n_seq_max=8, n_batch=100)
    jobs = [EmbeddingJob(((1, 2, 3),)), EmbeddingJob(((4,), (5, 6))), EmbeddingJob(((7,) * 95, (8,)))]
    for job in jobs:
        queue.add(job)
    first = queue.next_batch()
    assert first is not None
    assert first.inputs == [(1, 2, 3), (4,), (5, 6)]  # the 95-token input does not fit beside them
    assert queue.complete(first, [b"a", b"b", b"c"]) == 2
    assert jobs[0].future.result() == [b"a"] and jobs[1].future.result() == [b"b", b"c"]
    jobs[2].future.cancel()  # its client left: its inputs are dropped, not decoded
    assert queue.next_batch() is None and len(queue) == 0


async def test_concurrent_requests_share_decodes() -> None:
    config = FakeEmbedderConfig(delay_s=0.05)
    async with serve_embeddings(config) as served:
        bodies = await asyncio.gather(*(embed(served, input=f"request {index}") for index in range(8)))
        for index, body in enumerate(bodies):
            np.testing.assert_allclose(vectors(body)[0], expected(served, f"request {index}"), atol=1e-6)
        assert len(served.embedder.batches) < 8  # the ones waiting during a decode went together


async def test_an_input_embedded_alone_equals_it_embedded_among_others() -> None:
    async with serve_embeddings() as served:
        texts = ["The cat sat on the mat", "x", "Quarterly tax filing deadlines", "hi"]
        together = vectors(await embed(served, input=texts))
        for text, vector in zip(texts, together, strict=True):
            (alone,) = vectors(await embed(served, input=text))
            np.testing.assert_allclose(alone, vector, atol=1e-6)


async def test_embedding_decodes_interleave_with_running_chat_steps() -> None:
    backend_config = FakeBackendConfig(step_delay_s=0.005, eos_logit=-100.0)
    async with serve_embeddings(FakeEmbedderConfig(n_seq_max=2, delay_s=0.005), backend_config) as served:
        chat = asyncio.create_task(
            served.client.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "ignore_eos": True},
            )
        )
        await wait_for(lambda: served.backend.n_decode_calls > 2)
        await embed(served, input=[f"input {index}" for index in range(16)])  # 8 decodes of 2
        assert not chat.done()  # the chat was running all along
        decodes = served.embedder.chat_decodes_before
        assert len(decodes) == 8
        # a chat step ran between every two embedding decodes: the stream waited one decode at most
        assert all(later > earlier for earlier, later in itertools.pairwise(decodes))
        assert (await chat).status_code == 200


async def test_embeddings_off_is_a_400_that_says_how_to_turn_them_on() -> None:
    async with serve() as served:
        body = await embed(served, 400, input="hi")
        assert body["error"]["code"] == "embeddings_disabled"
        assert body["error"]["param"] == "model"
        assert "--embeddings" in body["error"]["message"] and "embedding: true" in body["error"]["message"]


@pytest.mark.parametrize(
    ("request_body", "param", "words"),
    [
        ({"input": ""}, "input", "empty string"),
        ({"input": []}, "input", "non-empty"),
        ({"input": ["a", ""]}, "input", "input[1] is an empty string"),
        ({"input": [[1], []]}, "input", "input[1] is an empty token list"),
        ({"input": [1.5]}, "input", "input[0]"),
        ({"input": None}, "input", "non-empty"),
        ({"input": [N_VOCAB]}, "input", "outside"),
        ({"input": [[1], [-1]]}, "input", "input[1] holds token ids outside"),
        ({"input": "x" * 65}, "input", "at most 64 tokens"),
        ({"input": "hi", "encoding_format": "int8"}, "encoding_format", "float"),
        ({"input": "hi", "dimensions": 8}, "dimensions", "cannot shorten"),
        ({"input": "hi", "dimensions": 0}, "dimensions", "greater than"),
        ({"input": ["a"] * 2049}, "input", "at most 2048"),
    ],
)
async def test_bad_input_is_a_400_naming_the_param(request_body: dict[str, Any], param: str, words: str) -> None:
    async with serve_embeddings() as served:
        body = await embed(served, 400, **request_body)
        assert body["error"]["type"] == "invalid_request_error"
        assert body["error"]["param"] == param
        assert words in body["error"]["message"]
        assert not served.embedder.batches  # nothing reached the model


async def test_too_long_is_context_length_exceeded_and_dimensions_equal_is_fine() -> None:
    async with serve_embeddings() as served:
        body = await embed(served, 400, input=["ok", "y" * 100])
        assert body["error"]["code"] == "context_length_exceeded"
        assert "input[1] has 100 tokens" in body["error"]["message"]
        assert len(vectors(await embed(served, input="hi", dimensions=16))[0]) == 16


async def test_another_model_is_a_404() -> None:
    async with serve_embeddings() as served:
        body = await embed(served, 404, input="hi", model="text-embedding-3-small")
        assert body["error"]["code"] == "model_not_found"


async def test_a_failed_decode_fails_its_request_only() -> None:
    async with serve_embeddings(FakeEmbedderConfig(fail_on_token=ord("!"))) as served:
        body = await embed(served, 500, input=["fine", "boom!"])
        assert body["error"]["code"] == "decode_failed"
        (vector,) = vectors(await embed(served, input="fine"))  # the engine keeps serving
        np.testing.assert_allclose(vector, expected(served, "fine"), atol=1e-6)


async def test_a_request_past_its_timeout_is_a_504() -> None:
    async with serve_embeddings(FakeEmbedderConfig(n_seq_max=1, delay_s=0.1), request_timeout_s=0.15) as served:
        body = await embed(served, 504, input=["a", "b", "c", "d"])
        assert body["error"]["code"] == "request_timeout"
        await wait_for(lambda: len(served.embedder.batches) >= 2)
        await asyncio.sleep(0.3)
        assert len(served.embedder.batches) < 4  # the inputs of the abandoned request were dropped


def test_embeddings_are_on_by_flag_env_or_models_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = tmp_path / "models.yaml"
    registry.write_text(
        json.dumps(
            {
                "default": "chat",
                "models": {
                    "chat": {"package": {"module": "m", "file": "a.gguf"}},
                    "embedder": {"package": {"module": "m", "file": "b.gguf"}, "embedding": True},
                },
            }
        )
    )
    assert load_registry(registry).entry("embedder").embedding
    assert not embeddings_wanted(Settings(models_file=registry))
    assert embeddings_wanted(Settings(models_file=registry, model="embedder"))
    assert embeddings_wanted(load_settings(["--models-file", str(registry), "--embeddings", "--pooling", "last"]))
    assert load_settings(["--pooling", "cls"]).pooling == "cls"
    assert not embeddings_wanted(Settings(models_file=registry, model=str(tmp_path / "x.gguf")))
    monkeypatch.setenv("QWEN3_LOCAL_EMBEDDINGS", "1")
    assert embeddings_wanted(load_settings(["--models-file", str(registry)]))
